"""House rules that keep the code readable, checked on every run: short functions, the import
direction of the library, the generated option docs."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

MAX_FUNCTION_LINES = 60


def _python_files() -> list[Path]:
    return sorted((ROOT / "stages").rglob("*.py")) + [ROOT / "pipeline.py"]


def test_no_function_over_60_lines():
    long = []
    for path in _python_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, "functions over 60 lines:\n" + "\n".join(long)


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def test_the_library_never_imports_a_command():
    """stages/core is the library; the commands in stages/ use it, never the other way round."""
    commands = {f"stages.{p.stem}" for p in (ROOT / "stages").glob("*.py") if p.stem != "__init__"}
    for path in sorted((ROOT / "stages" / "core").glob("*.py")):
        wrong = _imports(path) & commands
        assert not wrong, f"{path.name} imports the command module(s) {wrong}"


def test_config_and_schemas_are_the_bottom_of_the_graph():
    """config imports no project module but errors; schemas/ imports only pyarrow."""
    assert {m for m in _imports(ROOT / "stages" / "core" / "config.py") if m.startswith("stages")} == {
        "stages.core.errors"}
    for path in (ROOT / "schemas").glob("*.py"):
        assert all(m.split(".")[0] in ("pyarrow", "schemas", "__future__") for m in _imports(path)), path.name
    storage = _imports(ROOT / "stages" / "core" / "storage.py")
    assert not any(m.startswith("stages.core.") and m != "stages.core.errors" for m in storage), storage


def test_option_docs_are_generated_from_the_configs():
    from stages.core.config import options_markdown

    assert (ROOT / "docs" / "options.md").read_text() == options_markdown(), (
        "docs/options.md is stale: run `.venv/bin/python -m stages.core.config > docs/options.md`")
