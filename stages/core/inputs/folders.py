"""What a --data path names: an embedded sample set, a file, or a folder of data files, searched
recursively; and the output folders of this project given as --data (judge's pairs are read, the
others -- generate's candidates, precompute's refs, iterate's rounds -- are an error saying where
their rows are).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from schemas.manifest import output_of_manifest
from stages.core import storage
from stages.core.inputs.files import SUFFIXES, DataError, base_suffix

REPO_DATA = Path(__file__).resolve().parents[3] / "data"  # the repository's data/ folder
# name -> (file, layout used when --format is auto): HH text goes through the chat template,
# which suits the embedded instruct model.
EMBEDDED_DATA = {
    "embedded:hh-rlhf-helpful": (REPO_DATA / "hh_rlhf_helpful_base_demo_train.jsonl.gz", "hh"),
    "embedded:hh-rlhf-helpful-heldout": (REPO_DATA / "hh_rlhf_helpful_base_demo_heldout.jsonl.gz", "hh"),
    # prompts only, for generate / iterate: single-turn user messages (no answers)
    "embedded:hh-rlhf-helpful-prompts": (REPO_DATA / "hh_rlhf_helpful_base_prompts.jsonl", "standard"),
}


def resolve_source(data: str) -> str:
    return str(EMBEDDED_DATA[data][0]) if data in EMBEDDED_DATA else data


def embedded_layout(data: str) -> str | None:
    return EMBEDDED_DATA[data][1] if data in EMBEDDED_DATA else None


# Files this project writes beside its data (a summary, the rows it left out, every candidate's score):
# never rows, wherever they are.
SIDE_FILES = ("manifest.json", "rejects.jsonl", "scores.jsonl")
# Output folders of this project that hold no rows to read (`output_kind`), and where the rows are.
NOT_DATA = {
    "candidates": "{url} is generate's output: prompts with sampled responses, not pairs. Judge them into pairs "
                  "first (pipeline.py judge --candidates {url} --output PAIRS) and read PAIRS; generate --prompts "
                  "takes this folder as it is (its prompts)",
    "refs": "{url} is precompute's output (reference log-probs), not input data: train, eval and sweep take it "
            "as --refs",
    "rounds": "{url} holds iterate's rounds, not input data: each round's pairs are in {url}/round-K/pairs",
}


def _manifest_kind(fs, folder: str) -> str | None:
    try:
        with fs.open(f"{folder}/manifest.json", "rb") as fh:
            manifest = json.loads(fh.read())
    except (OSError, ValueError):  # unreadable: judged by the folder's other files
        return None
    return output_of_manifest(manifest)


def _kind(fs, folder: str, names: set[str], progress: set[str]) -> str | None:
    """Which output of this project a folder holding `names` is (its `_progress/` holding `progress`):
    by its manifest's kind, else by the files its stage writes before the manifest (a run cut off)."""
    kind = _manifest_kind(fs, folder) if "manifest.json" in names else None
    if kind:
        return kind
    if "run.json" in progress:
        return "refs"
    if "iterate.json" in names:
        return "rounds"
    if "pairs.jsonl" in names and "scores.jsonl" in names:
        return "pairs"
    if any(re.fullmatch(r"candidates-\d+\.parquet", n) for n in names):
        return "candidates"
    return None


def _names_by_folder(paths: list[str]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for p in paths:
        folder, name = p.rsplit("/", 1)
        out.setdefault(folder, set()).add(name)
    return out


def output_kind(data: str, storage_options: dict | None = None) -> str | None:
    """pairs (judge), candidates (generate), refs (precompute), rounds (iterate) for a folder this project
    wrote; None for anything else."""
    fs, path = storage.filesystem(resolve_source(data), storage_options)
    if not fs.isdir(path):
        return None
    path = path.rstrip("/")
    found = _names_by_folder(fs.find(path))
    return _kind(fs, path, found.get(path, set()), found.get(f"{path}/_progress", set()))


def _owner(path: str, root: str, kinds: dict[str, str]) -> str | None:
    """The output folder below `root` (or root itself) that a file is in, if any."""
    folder = path.rsplit("/", 1)[0]
    while len(folder) >= len(root):
        if folder in kinds:
            return folder
        folder = folder.rsplit("/", 1)[0]
    return None


def _folder_files(data: str, fs, path: str) -> list[str]:
    """The data files in a folder, searched recursively. An output folder of this project in it gives its
    pairs.jsonl (judge) or is an error saying where its rows are; side files are never data."""
    path = path.rstrip("/")
    every = sorted(fs.find(path))
    by_folder = _names_by_folder(every)
    # a precompute output cut off early may hold files only in its subfolders (_progress/, shards/)
    folders = set(by_folder) | {f.rsplit("/", 1)[0] for f in by_folder if f.endswith("/_progress")}
    kinds = {f: k for f in folders
             if (k := _kind(fs, f, by_folder.get(f, set()), by_folder.get(f"{f}/_progress", set())))}
    files = []
    for p in every:
        name = os.path.basename(p)
        owner = _owner(p, path, kinds)
        if owner is not None and kinds[owner] != "pairs":
            raise DataError(NOT_DATA[kinds[owner]].format(url=storage.unstrip(data, fs, owner)))
        if owner is not None and name != "pairs.jsonl":
            continue
        if base_suffix(p) in SUFFIXES and not name.startswith((".", "_")) and name not in SIDE_FILES:
            files.append(p)
    if not files:
        found = sorted(os.path.basename(p) for p in fs.ls(path, detail=False))[:20]
        side = [n for n in found if n in SIDE_FILES]
        raise DataError(f"no {'/'.join(SUFFIXES)} files in {data} (found: {', '.join(found) or 'nothing'})"
                        + (f"; {', '.join(side)} are what this project writes beside its data, not data"
                           if side else ""))
    return [storage.unstrip(data, fs, p) for p in files]


def check_exists(data: str, storage_options: dict | None = None) -> None:
    """DataError naming a missing input and what its folder holds instead."""
    fs, path = storage.filesystem(data, storage_options)
    if fs.exists(path):
        return
    parent = path.rsplit("/", 1)[0] if "/" in path else "."
    try:
        found = sorted(os.path.basename(p) for p in fs.ls(parent, detail=False))[:20]
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        found = []
    raise DataError(f"input not found: {data}" + (f" (in {parent}: {', '.join(found)})" if found else ""))


def list_input_files(data: str, storage_options: dict | None = None) -> list[str]:
    """The data files an input path names, sorted; raises DataError naming what was found instead."""
    check_exists(data, storage_options)
    fs, path = storage.filesystem(data, storage_options)
    if fs.isdir(path):
        return _folder_files(data, fs, path)
    if base_suffix(path) not in SUFFIXES:
        raise DataError(f"{data}: unknown file type; expected one of {', '.join(SUFFIXES)} (optionally .gz)")
    return [data]
