"""Read preference data from a file, a folder, a `save_to_disk` folder or a hub name, local or fsspec.

`read_rows` yields (source_index, row) in a fixed order (files sorted by name, rows in file
order), so `source_index` is the row's position in the input and the same on every run. A line
that is not valid JSON comes out as a `MalformedRow` carrying its file and line number, to be
rejected rather than to stop a long run.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from stages.core import storage
from stages.core.errors import PipelineError

REPO_DATA = Path(__file__).resolve().parents[2] / "data"  # the repository's data/ folder
# name -> (file, layout used when --format is auto): HH text goes through the chat template,
# which suits the embedded instruct model.
EMBEDDED_DATA = {
    "embedded:hh-rlhf-helpful": (REPO_DATA / "hh_rlhf_helpful_base_demo_train.jsonl.gz", "hh"),
    "embedded:hh-rlhf-helpful-heldout": (REPO_DATA / "hh_rlhf_helpful_base_demo_heldout.jsonl.gz", "hh"),
}
SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


class DataError(PipelineError, ValueError):
    """The input cannot be read at all (missing file, missing column, unknown format)."""


@dataclass(frozen=True)
class MalformedRow:
    file: str
    line: int
    text: str
    error: str


def _base_suffix(name: str) -> str:
    for comp in (".gz", ".bz2", ".xz", ".zst"):
        if name.endswith(comp):
            name = name[: -len(comp)]
    return os.path.splitext(name)[1].lower()


def resolve_source(data: str) -> str:
    return str(EMBEDDED_DATA[data][0]) if data in EMBEDDED_DATA else data


def embedded_layout(data: str) -> str | None:
    return EMBEDDED_DATA[data][1] if data in EMBEDDED_DATA else None


def list_input_files(data: str, storage_options: dict | None = None) -> list[str]:
    """The data files an input path names, sorted; raises DataError naming what was found instead."""
    fs, path = storage.filesystem(data, storage_options)
    if not fs.exists(path):
        parent = path.rsplit("/", 1)[0] if "/" in path else "."
        try:
            found = sorted(os.path.basename(p) for p in fs.ls(parent, detail=False))[:20]
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            found = []
        raise DataError(f"input not found: {data}" + (f" (in {parent}: {', '.join(found)})" if found else ""))
    if fs.isdir(path):
        files = sorted(p for p in fs.find(path) if _base_suffix(p) in SUFFIXES
                       and not os.path.basename(p).startswith((".", "_")))
        if not files:
            found = sorted(os.path.basename(p) for p in fs.ls(path, detail=False))[:20]
            raise DataError(f"no {'/'.join(SUFFIXES)} files in {data} (found: {', '.join(found) or 'nothing'})")
        return [storage.unstrip(data, fs, p) for p in files]
    if _base_suffix(path) not in SUFFIXES:
        raise DataError(f"{data}: unknown file type; expected one of {', '.join(SUFFIXES)} (optionally .gz)")
    return [data]


def _is_saved_dataset(data: str, storage_options: dict | None) -> bool:
    fs, path = storage.filesystem(data, storage_options)
    markers = ("dataset_info.json", "dataset_dict.json", "state.json")
    return fs.isdir(path) and any(fs.exists(f"{path}/{m}") for m in markers)


def _looks_like_hub_name(data: str) -> bool:
    return "://" not in data and not os.path.exists(data) and data.count("/") == 1 and not data.startswith((".", "/"))


def _read_json_file(url: str, storage_options: dict | None) -> Iterator[Any]:
    with storage.open_text(url, storage_options) as fh:
        text = fh.read()
    stripped = text.lstrip()
    if url.endswith((".json", ".json.gz")) and stripped.startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{url}: not valid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
        yield from rows
        return
    if url.endswith((".json", ".json.gz")) and stripped.startswith("{"):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError:
            obj = None  # JSON Lines under a .json name
        if isinstance(obj, dict):
            lists = [v for v in obj.values() if isinstance(v, list)]
            if len(lists) == 1 and all(isinstance(r, dict) for r in lists[0]):
                yield from lists[0]  # {"data": [...]} and similar wrappers
            else:
                yield obj
            return
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield json.loads(line)
        except json.JSONDecodeError as e:
            yield MalformedRow(url, lineno, line[:2000], e.msg)


def _read_parquet_file(url: str, storage_options: dict | None) -> Iterator[dict]:
    import pyarrow.parquet as pq

    with storage.open_binary(url, storage_options) as fh:
        pf = pq.ParquetFile(fh)
        for batch in pf.iter_batches(batch_size=1024):
            yield from batch.to_pylist()


def _read_csv_file(url: str, storage_options: dict | None) -> Iterator[dict]:
    import csv

    with storage.open_text(url, storage_options, newline="") as fh:
        yield from csv.DictReader(fh)


def read_file(url: str, storage_options: dict | None = None) -> Iterator[Any]:
    kind = _base_suffix(url)
    if kind in (".jsonl", ".json"):
        yield from _read_json_file(url, storage_options)
    elif kind == ".parquet":
        yield from _read_parquet_file(url, storage_options)
    elif kind == ".csv":
        yield from _read_csv_file(url, storage_options)
    else:
        raise DataError(f"{url}: unknown file type")


def read_rows(data: str, split: str = "train", limit: int | None = None,
              storage_options: dict | None = None) -> Iterator[tuple[int, Any]]:
    """(source_index, raw row or MalformedRow), in input order, at most `limit` rows."""
    source = resolve_source(data)
    if _looks_like_hub_name(source) or _is_saved_dataset(source, storage_options):
        rows: Iterator[Any] = _read_datasets(source, split, storage_options)
    else:
        files = list_input_files(source, storage_options)
        rows = (row for f in files for row in read_file(f, storage_options))
    for index, row in enumerate(rows):
        if limit is not None and index >= limit:
            return
        yield index, row


def _read_datasets(source: str, split: str, storage_options: dict | None) -> Iterator[dict]:
    import datasets

    if _looks_like_hub_name(source):
        ds = datasets.load_dataset(source, split=split)
    else:
        ds = datasets.load_from_disk(source, storage_options=storage_options)
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{source}: no split '{split}' (found: {', '.join(ds.keys())})")
        ds = ds[split]
    yield from ds


def check_columns(first_row: Any, layout: str, cfg: Any) -> None:
    """A column missing from the first row is an input error naming it, not a reject per row."""
    if not isinstance(first_row, dict):
        return
    need = {
        "standard": [cfg.chosen_column, cfg.rejected_column],
        "ultrafeedback": [cfg.chosen_column, cfg.rejected_column],
        "hh": [cfg.chosen_column, cfg.rejected_column],
        "openai": ["input", "preferred_output", "non_preferred_output"],
        "sharegpt": ["conversations", "chosen", "rejected"],
        "helpsteer3": ["context", "response1", "response2", "overall_preference"],
    }[layout]
    missing = [c for c in need if c not in first_row]
    if missing:
        raise DataError(f"column(s) {', '.join(map(repr, missing))} not found for format '{layout}'; "
                        f"the input has: {', '.join(map(repr, first_row.keys()))}")
