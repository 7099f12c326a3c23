"""House rule of the refs folder's owner: outside stages/core/refs/ nothing reads a precompute
manifest key by string; code reads the typed `Manifest`'s attributes (refs/manifest.py)."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

from stages.core.refs.manifest import Manifest

KEYS = set(Manifest.KEYS)
OWNER = ROOT / "stages" / "core" / "refs"
NAMES = {"manifest", "refs_manifest"}  # variables that hold a precompute manifest; also `<x>.manifest`


def _is_manifest(node: ast.AST) -> bool:
    return (isinstance(node, ast.Name) and node.id in NAMES) or (isinstance(node, ast.Attribute)
                                                                 and node.attr == "manifest")


def _key(node: ast.AST) -> str | None:
    return node.value if isinstance(node, ast.Constant) and node.value in KEYS else None


def string_reads(path: Path) -> list[str]:
    """`manifest["key"]`, `manifest.get("key")`, `"key" in manifest` with a manifest key, in one file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        key = None
        if isinstance(node, ast.Subscript) and _is_manifest(node.value):
            key = _key(node.slice)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
              and _is_manifest(node.func.value) and node.args):
            key = _key(node.args[0])
        elif isinstance(node, ast.Compare) and any(_is_manifest(c) for c in node.comparators):
            key = _key(node.left)
        if key:
            found.append(f"{path.relative_to(ROOT)}:{node.lineno} reads manifest key {key!r} by string")
    return found


def test_only_the_refs_package_reads_manifest_keys_by_string():
    files = sorted((ROOT / "stages").rglob("*.py")) + [ROOT / "pipeline.py"]
    reads = [r for path in files if OWNER not in path.parents for r in string_reads(path)]
    assert not reads, "use the typed Manifest's attributes (stages/core/refs/manifest.py):\n" + "\n".join(reads)


def test_the_rule_sees_a_string_read(tmp_path):
    probe = ROOT / "stages" / "_probe_refs_house.py"
    try:
        probe.write_text('def f(refs, manifest):\n    return refs.manifest["max_length"], manifest.get("kind"), '
                         '"shards" in manifest, manifest["settings"]\n')
        assert [r.split(" reads ")[1] for r in string_reads(probe)] == [
            "manifest key 'max_length' by string", "manifest key 'kind' by string",
            "manifest key 'shards' by string"]
    finally:
        probe.unlink()
