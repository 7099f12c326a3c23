"""Read preference data from a file, a folder, a `save_to_disk` folder or a hub name, local or fsspec.

`read_rows` yields (source_index, row) in a fixed order (files sorted by name, rows in file
order), so `source_index` is the row's position in the input and the same on every run. A line
that cannot be read (not JSON, not UTF-8, the broken end of a cut archive) comes out as a
`MalformedRow` carrying its file, line number and reason, to be rejected rather than to stop a
long run. Files that only make sense whole (a .json array, Parquet) fail whole, as a DataError.
"""

from __future__ import annotations

import gzip
import io
import json
import lzma
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Iterator

from schemas.manifest import output_of_manifest
from stages.core import storage
from stages.core.errors import PipelineError
from stages.core.inputs.formats import Columns

REPO_DATA = Path(__file__).resolve().parents[3] / "data"  # the repository's data/ folder
# name -> (file, layout used when --format is auto): HH text goes through the chat template,
# which suits the embedded instruct model.
EMBEDDED_DATA = {
    "embedded:hh-rlhf-helpful": (REPO_DATA / "hh_rlhf_helpful_base_demo_train.jsonl.gz", "hh"),
    "embedded:hh-rlhf-helpful-heldout": (REPO_DATA / "hh_rlhf_helpful_base_demo_heldout.jsonl.gz", "hh"),
    # prompts only, for generate / iterate: single-turn user messages (no answers)
    "embedded:hh-rlhf-helpful-prompts": (REPO_DATA / "hh_rlhf_helpful_base_prompts.jsonl", "standard"),
}
SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
BOM = b"\xef\xbb\xbf"  # a UTF-8 byte order mark, as some Windows tools write at the start of a file
BLOCK = 1 << 20  # bytes read at a time from a JSON Lines file
TEXT_CAP = 2000  # characters of a bad line kept in its reject
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abcdefABCDEF]")
# What a cut or damaged archive raises while being read (EOFError: it ends mid-stream). A plain
# OSError is left out on purpose: it is also how a storage failure surfaces.
DECOMPRESSION_ERRORS = (EOFError, zlib.error, gzip.BadGzipFile, lzma.LZMAError)


class DataError(PipelineError, ValueError):
    """The input cannot be read at all (missing file, missing column, unknown format)."""


@dataclass(frozen=True)
class MalformedRow:
    """An input line that cannot become a row. `reason` is its reject reason: malformed_json, bad_encoding
    (bytes that are not UTF-8), malformed_csv, truncated_file or corrupt_file (a compressed file that stops:
    this row stands for the rest of it). `text` is the line as far as it decodes, at most TEXT_CAP characters."""

    file: str
    line: int
    text: str
    error: str
    reason: str = "malformed_json"


def base_suffix(name: str) -> str:
    for comp in (".gz", ".bz2", ".xz", ".zst"):
        if name.endswith(comp):
            name = name[: -len(comp)]
    return os.path.splitext(name)[1].lower()


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


class BrokenStream(Exception):
    """A compressed stream that stops mid-way; `partial` is the unfinished line it was in."""

    def __init__(self, partial: bytes, cause: BaseException):
        super().__init__(str(cause))
        self.partial, self.cause = partial, cause


def byte_lines(fh: IO[bytes]) -> Iterator[bytes]:
    """The stream's lines, split on b"\\n" only (U+2028, U+0085 and the like are text inside a JSON
    string), without a trailing "\\r". Read a block at a time, so a file is never held whole."""
    # read1: one decompression step per call, so a cut archive loses no byte that came before the cut.
    read = getattr(fh, "read1", None) or fh.read
    parts: list[bytes] = []  # the line being assembled, when it spans blocks
    while True:
        try:
            block = read(BLOCK)
        except DECOMPRESSION_ERRORS as e:
            raise BrokenStream(b"".join(parts), e) from None
        if not block:
            break
        pieces = block.split(b"\n")
        if len(pieces) > 1:
            yield _chomp(b"".join([*parts, pieces[0]]))
            yield from map(_chomp, pieces[1:-1])
            parts = []
        if pieces[-1]:
            parts.append(pieces[-1])
    if parts:
        yield _chomp(b"".join(parts))


def _broken(e: BaseException) -> tuple[str, str]:
    """(reject reason, what happened) for an archive that stops being readable."""
    if isinstance(e, EOFError):
        return "truncated_file", "ends mid-stream"
    return "corrupt_file", f"is corrupt ({type(e).__name__}: {e})"


def _chomp(line: bytes) -> bytes:
    return line[:-1] if line.endswith(b"\r") else line


def _preview(line: bytes) -> str:
    # 4 bytes per character at most: decoding this much always gives TEXT_CAP characters.
    return line[: 4 * TEXT_CAP].decode("utf-8", "replace")[:TEXT_CAP]


def _lone_surrogate(value: Any) -> str | None:
    """The first lone surrogate (a "\\udXXX" escape JSON allows but UTF-8 cannot hold) in a parsed value."""
    stack = [value]  # a loop, not recursion: the value may be nested as deep as the parser allows
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError as e:
                return f"\\u{ord(v[e.start]):04x}"
        elif isinstance(v, list):
            stack.extend(v)
        elif isinstance(v, dict):
            stack.extend(v)
            stack.extend(v.values())
    return None


def _parse_line(url: str, lineno: int, line: bytes) -> Any:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        return MalformedRow(url, lineno, _preview(line), f"not valid UTF-8 at byte {e.start + 1}: {e.reason}",
                            "bad_encoding")
    try:
        row = json.loads(text)
    except json.JSONDecodeError as e:
        return MalformedRow(url, lineno, text[:TEXT_CAP], f"{e.msg} (column {e.colno})")
    except (ValueError, RecursionError) as e:  # an integer over 4300 digits; nesting deeper than the stack
        return MalformedRow(url, lineno, text[:TEXT_CAP], f"{type(e).__name__}: {str(e)[:200]}")
    # Only an escape can make a lone surrogate (strict UTF-8 decoding refuses encoded ones), so most
    # lines skip the walk. Such a string could not be hashed, stored or tokenized later.
    lone = _lone_surrogate(row) if _SURROGATE_ESCAPE.search(line) else None
    if lone:
        return MalformedRow(url, lineno, text[:TEXT_CAP], f"lone surrogate {lone} is not valid Unicode",
                            "bad_encoding")
    return row


def _jsonl_rows(url: str, fh: IO[bytes]) -> Iterator[Any]:
    """One value or MalformedRow per non-blank line; a cut or corrupt archive ends in one MalformedRow."""
    lineno = 0
    try:
        for lineno, line in enumerate(byte_lines(fh), start=1):
            if lineno == 1 and line.startswith(BOM):
                line = line[len(BOM):]
            if line.strip():
                yield _parse_line(url, lineno, line)
    except BrokenStream as e:
        reason, what = _broken(e.cause)
        yield MalformedRow(url, lineno + 1, _preview(e.partial), f"the compressed file {what} here: the rest of it "
                           "is lost; re-create or re-download it", reason)


def _read_jsonl_file(url: str, storage_options: dict | None) -> Iterator[Any]:
    with storage.open_binary(url, storage_options) as fh:
        yield from _jsonl_rows(url, fh)


def _parse_document(url: str, data: bytes) -> Any:
    """A whole .json file: one bad byte or syntax error makes the file unreadable, so it is a DataError."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{url}: not valid UTF-8 at byte {e.start + 1}: {e.reason}") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{url}: not valid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except (ValueError, RecursionError) as e:
        raise DataError(f"{url}: not readable JSON: {type(e).__name__}: {str(e)[:200]}") from None
    return doc


def _check_surrogates(url: str, data: bytes, doc: Any) -> None:
    lone = _lone_surrogate(doc) if _SURROGATE_ESCAPE.search(data) else None
    if lone:
        raise DataError(f"{url}: holds the lone surrogate {lone}, which is not valid Unicode")


def _read_json_file(url: str, storage_options: dict | None) -> Iterator[Any]:
    """A .json file: an array of rows, an object wrapping one ({"data": [...]}), one object, or JSON Lines."""
    with storage.open_binary(url, storage_options) as fh:
        try:
            data = fh.read()
        except DECOMPRESSION_ERRORS as e:
            raise DataError(f"{url}: the compressed file {_broken(e)[1]}; re-create or re-download it") from None
    body = data[len(BOM):] if data.startswith(BOM) else data
    head = body.lstrip()[:1]
    if head == b"[":
        rows = _parse_document(url, body)
        _check_surrogates(url, body, rows)
        yield from rows
        return
    if head == b"{":
        try:
            obj = _parse_document(url, body)
        except DataError:
            obj = None  # JSON Lines under a .json name
        if isinstance(obj, dict):
            _check_surrogates(url, body, obj)
            lists = [v for v in obj.values() if isinstance(v, list)]
            if len(lists) == 1 and all(isinstance(r, dict) for r in lists[0]):
                yield from lists[0]  # {"data": [...]} and similar wrappers
            else:
                yield obj
            return
    yield from _jsonl_rows(url, io.BytesIO(data))


def _read_parquet_file(url: str, storage_options: dict | None) -> Iterator[dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with storage.open_binary(url, storage_options) as fh:
        try:
            pf = pq.ParquetFile(fh)
            for batch in pf.iter_batches(batch_size=1024):
                yield from batch.to_pylist()
        except (pa.ArrowInvalid, UnicodeDecodeError) as e:  # cut short, not Parquet, or bad UTF-8 in a string
            raise DataError(f"{url}: not a readable Parquet file: {str(e)[:300]}") from None


def _bad_csv_row(url: str, line: int, header: list[str], fields: list[str]) -> MalformedRow | None:
    """A row with bytes that are not UTF-8 (kept as surrogates by the decoder) or more fields than the header."""
    for f in fields:
        try:
            f.encode("utf-8")
        except UnicodeEncodeError as e:
            shown = [x.encode("utf-8", "surrogateescape").decode("utf-8", "replace") for x in fields]
            return MalformedRow(url, line, json.dumps(shown, ensure_ascii=False)[:TEXT_CAP],
                                f"not valid UTF-8 (byte 0x{ord(f[e.start]) - 0xDC00:02x})", "bad_encoding")
    if len(fields) > len(header):
        return MalformedRow(url, line, json.dumps(fields, ensure_ascii=False)[:TEXT_CAP],
                            f"{len(fields)} fields, the header has {len(header)}", "malformed_csv")
    return None


def _read_csv_file(url: str, storage_options: dict | None) -> Iterator[Any]:
    """Rows as dicts (missing trailing fields are None, as with csv.DictReader), or MalformedRow."""
    import csv

    # Long-context fields pass csv's default 128 KiB limit; this only ever raises the process-wide limit.
    csv.field_size_limit(max(csv.field_size_limit(), 1 << 30))
    with storage.open_binary(url, storage_options) as raw, \
            io.TextIOWrapper(raw, encoding="utf-8-sig", errors="surrogateescape", newline="") as fh:
        reader = csv.reader(fh)
        line = 0  # the last line read: a quoted field may span lines, so a record starts at line + 1
        try:
            header = next(reader, None)
            if header is None:
                return
            if _bad_csv_row(url, 1, header, header):
                raise DataError(f"{url}: the header line is not valid UTF-8: {header[:20]}")
            line = reader.line_num
            for fields in reader:
                start, line = line + 1, reader.line_num
                if fields:  # blank lines are skipped, as csv.DictReader does
                    bad = _bad_csv_row(url, start, header, fields)
                    yield bad or dict(zip(header, fields + [None] * (len(header) - len(fields))))
        except csv.Error as e:
            raise DataError(f"{url} line {reader.line_num}: not readable CSV: {e}") from None
        except DECOMPRESSION_ERRORS as e:
            reason, what = _broken(e)
            yield MalformedRow(url, line + 1, "", f"the compressed file {what} here: the rest of it is lost; "
                               "re-create or re-download it", reason)


def read_file(url: str, storage_options: dict | None = None) -> Iterator[Any]:
    kind = base_suffix(url)
    if kind == ".jsonl":
        yield from _read_jsonl_file(url, storage_options)
    elif kind == ".json":
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
