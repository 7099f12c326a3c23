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


def _module(path: Path) -> str:
    """stages/core/inputs/readers.py -> stages.core.inputs.readers (a package: its folder's name)."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _library() -> list[Path]:
    return sorted((ROOT / "stages" / "core").rglob("*.py"))


def _commands() -> set[str]:
    return {f"stages.{p.stem}" for p in (ROOT / "stages").glob("*.py") if p.stem != "__init__"}


def test_the_library_never_imports_a_command():
    """stages/core is the library; the commands in stages/ use it, never the other way round."""
    for path in _library():
        wrong = _imports(path) & _commands()
        assert not wrong, f"{path.relative_to(ROOT)} imports the command module(s) {wrong}"


# The library's floors, lowest first: a module imports from its own floor or below, so imports point
# down the pipeline (inputs/runtime -> scoring -> refs -> training -> online -> the commands).
FLOORS = (
    {"errors", "storage", "conditional", "lease", "plots", "config", "console"},
    {"inputs", "runtime"},
    {"scoring"},
    {"refs"},
    {"training"},
    {"online"},
)
# Rooms on one floor that stay apart: reading the data never needs a device or a model, and the reverse.
APART = {("inputs", "runtime"), ("runtime", "inputs")}


def _room(module: str) -> str | None:
    """stages.core.inputs.readers -> inputs; stages.core.config(.engine) -> config; a command -> None."""
    parts = module.split(".")
    return parts[2] if len(parts) > 2 and parts[:2] == ["stages", "core"] else None


def _floor(room: str) -> int:
    return next(i for i, rooms in enumerate(FLOORS) if room in rooms)


def _project_imports(path: Path) -> set[str]:
    """The project modules a file imports; `from stages.core.inputs import readers` names the module."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("stages"):
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names
                         if (ROOT / (node.module + "." + a.name).replace(".", "/")).with_suffix(".py").exists())
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.startswith("stages"))
    return names


def test_every_library_module_sits_on_a_floor():
    rooms = {_room(_module(p)) for p in _library()} - {None}
    assert rooms <= set().union(*FLOORS), f"rooms on no floor (add them to FLOORS): {rooms - set().union(*FLOORS)}"


def test_the_library_imports_point_down_the_pipeline():
    wrong = []
    for path in _library():
        here = _room(_module(path))
        if here is None:  # stages/core/__init__.py: the map, no imports
            continue
        for name in _project_imports(path):
            there = _room(name)
            if there and there != here and (_floor(there) > _floor(here) or (here, there) in APART):
                wrong.append(f"{path.relative_to(ROOT)} ({here}) imports {name} ({there})")
    assert not wrong, "imports that run up the pipeline (or across rooms kept apart):\n" + "\n".join(wrong)


# The chain commands run other commands (their public run()); every other command is a leaf.
CHAIN_COMMANDS = {"stages.iterate", "stages.nightly", "stages.sweep"}


def test_a_leaf_command_imports_no_other_command():
    wrong = []
    for path in sorted((ROOT / "stages").glob("*.py")):
        if _module(path) in CHAIN_COMMANDS or path.stem == "__init__":
            continue
        others = {n for n in _project_imports(path) if n in _commands()} - {_module(path)}
        if others:
            wrong.append(f"{path.relative_to(ROOT)} imports {sorted(others)}")
    assert not wrong, "a leaf command imports another command (move what it needs into stages/core):\n" + "\n".join(
        wrong)


def test_no_module_imports_another_modules_private_names():
    """A name with a leading underscore is its module's own: shared helpers are public, in the right room."""
    wrong = []
    for path in _python_files() + sorted((ROOT / "bench").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("stages"):
                private = [a.name for a in node.names if a.name.startswith("_")]
                if private:
                    wrong.append(f"{path.relative_to(ROOT)}:{node.lineno} from {node.module} import {private}")
    assert not wrong, "private names imported from another module:\n" + "\n".join(wrong)


def test_config_and_schemas_are_the_bottom_of_the_graph():
    """config (a module or a package) imports no project module but errors and its own parts; schemas/
    imports only pyarrow."""
    config = ROOT / "stages" / "core" / "config"
    files = sorted(config.rglob("*.py")) if config.is_dir() else [config.with_suffix(".py")]
    for path in files:
        outside = {m for m in _imports(path) if m.startswith("stages") and not m.startswith("stages.core.config")}
        assert outside <= {"stages.core.errors"}, f"{path.relative_to(ROOT)} imports {outside}"
    for path in (ROOT / "schemas").glob("*.py"):
        assert all(m.split(".")[0] in ("pyarrow", "schemas", "__future__") for m in _imports(path)), path.name
    storage = _imports(ROOT / "stages" / "core" / "storage.py")
    assert not any(m.startswith("stages.core.") and m != "stages.core.errors" for m in storage), storage


def test_option_docs_are_generated_from_the_configs():
    from stages.core.config.commands import options_markdown

    assert (ROOT / "docs" / "options.md").read_text() == options_markdown(), (
        "docs/options.md is stale: run `.venv/bin/python -m stages.core.config > docs/options.md`")
