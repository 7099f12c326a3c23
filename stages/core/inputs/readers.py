"""Read preference data from a file, a folder, a `save_to_disk` folder or a hub name, local or fsspec.

`read_rows` yields (source_index, row) in a fixed order (files sorted by name, rows in file
order), so `source_index` is the row's position in the input and the same on every run. How one
file is read (and what a line that cannot be read becomes) is `files`; which files a path names,
`folders`.
"""

from __future__ import annotations

import os
from typing import Any, Iterator

from stages.core import storage
from stages.core.inputs.files import DataError, read_file
from stages.core.inputs.folders import list_input_files, resolve_source
from stages.core.inputs.formats import Columns


def is_saved_dataset(data: str, storage_options: dict | None) -> bool:
    fs, path = storage.filesystem(data, storage_options)
    markers = ("dataset_info.json", "dataset_dict.json", "state.json")
    return fs.isdir(path) and any(fs.exists(f"{path}/{m}") for m in markers)


def looks_like_hub_name(data: str) -> bool:
    """owner/name that is not a local path. When `owner` is a folder here, it is a local path mistyped:
    "input not found" with what the folder holds says more than a failed hub download."""
    if "://" in data or os.path.exists(data) or data.count("/") != 1 or data.startswith((".", "/")):
        return False
    return not os.path.isdir(data.split("/", 1)[0])


def read_rows(data: str, split: str = "train", limit: int | None = None,
              storage_options: dict | None = None) -> Iterator[tuple[int, Any]]:
    """(source_index, raw row or MalformedRow), in input order, at most `limit` rows."""
    source = resolve_source(data)
    if looks_like_hub_name(source) or is_saved_dataset(source, storage_options):
        rows: Iterator[Any] = _read_datasets(source, split, storage_options)
    else:
        files = list_input_files(source, storage_options)
        rows = (row for f in files for row in read_file(f, storage_options))
    for index, row in enumerate(rows):
        if limit is not None and index >= limit:
            return
        yield index, row


def load_split(source: str, split: str, storage_options: dict | None):
    """A hub name or `save_to_disk` folder as one `datasets.Dataset` (memory-mapped): its `split`."""
    import datasets

    if looks_like_hub_name(source):
        try:
            ds = datasets.load_dataset(source, split=split)
        except (OSError, ValueError) as e:  # no network, no such data set, no such split (datasets' errors)
            first = (str(e).strip().splitlines() or [""])[0][:300]
            raise DataError(f"{source}: not a file or folder here, and the Hugging Face hub did not give it: "
                            f"{type(e).__name__}: {first}") from None
    else:
        ds = datasets.load_from_disk(source, storage_options=storage_options)
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{source}: no split '{split}' (found: {', '.join(ds.keys())})")
        ds = ds[split]
    return ds


def _read_datasets(source: str, split: str, storage_options: dict | None) -> Iterator[dict]:
    yield from load_split(source, split, storage_options)


def check_columns(first_row: Any, layout: str, columns: Columns) -> None:
    """A column missing from the first row is an input error naming it, not a reject per row."""
    if not isinstance(first_row, dict):
        return
    need = {
        "standard": [columns.chosen, columns.rejected],
        "ultrafeedback": [columns.chosen, columns.rejected],
        "hh": [columns.chosen, columns.rejected],
        "openai": ["input", "preferred_output", "non_preferred_output"],
        "sharegpt": ["conversations", "chosen", "rejected"],
        "helpsteer3": ["context", "response1", "response2", "overall_preference"],
        "unpaired": [columns.prompt, columns.completion, columns.label],
    }[layout]
    # The default prompt column is optional (prompts are then taken from chosen/rejected); one the
    # user named is not: without this, a typo would silently switch to implicit prompts.
    if layout in ("standard", "ultrafeedback") and columns.prompt != "prompt":
        need.append(columns.prompt)
    missing = [c for c in need if c not in first_row]
    if missing:
        raise DataError(f"column(s) {', '.join(map(repr, missing))} not found for format '{layout}'; "
                        f"the input has: {', '.join(map(repr, first_row.keys()))}" + _prompts_only(first_row, columns))


def _prompts_only(row: dict, columns: Columns) -> str:
    """A hint for a row with a prompt and nothing to compare (generate's input given as pairs)."""
    answers = (columns.chosen, columns.rejected, columns.completion)
    if columns.prompt in row and not any(a in row for a in answers):
        return (". It holds prompts only: sample answers with pipeline.py generate, make pairs of them with "
                "pipeline.py judge, and give the judge's output here (pipeline.py iterate does all of it)")
    return ""
