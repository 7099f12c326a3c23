"""One input file's rows, by its format: JSON Lines, JSON, CSV and Parquet, plain or compressed
(.gz / .bz2 / .xz / .zst).

`read_file` yields a file's rows in file order. A line that cannot be read (not JSON, not UTF-8, the
broken end of a cut archive) comes out as a `MalformedRow` carrying its file, line number and reason, to
be rejected rather than to stop a long run. Files that only make sense whole (a .json array, Parquet)
fail whole, as a DataError.
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
from typing import IO, Any, Iterator

from stages.core import storage
from stages.core.errors import PipelineError

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

