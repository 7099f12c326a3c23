"""Prompts for sampling, from whatever a user has: a preference set precompute reads (its prompt, given
or extracted as TRL extracts it), prompt-only rows, or a plain list of prompts / message lists.

A prompt is a string (a standard prompt, tokenized as is) or a list of messages (conversational: the
chat template with the generation prompt), exactly what the trainer will see as the pair's prompt.
Rows without a usable prompt are rejects with a reason, as in precompute: rows read = prompts + rejects.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from typing import Any, Iterator

from stages.core import storage
from stages.core.inputs.candidates import read_candidates
from stages.core.inputs.files import MalformedRow
from stages.core.inputs.folders import check_exists, embedded_layout, output_kind, resolve_source
from stages.core.inputs.formats import (
    ADAPTERS,
    Columns,
    RowRejected,
    check_template_inputs,
    check_text,
    detect,
    is_blank,
    is_messages,
    normalise,
)
from stages.core.inputs.readers import read_rows
from stages.core.inputs.unpaired import is_unpaired

TEMPLATE_KEYS = ("tools", "chat_template_kwargs")  # row keys that change how a conversational prompt renders


def prompt_id(prompt: Any, template: dict | None = None) -> str:
    """Content hash of a prompt (and its template inputs): the same prompt gets the same id in every file."""
    body = json.dumps([prompt, template or None], sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(body.encode("utf-8")).hexdigest()[:32]


def _is_pair(raw: dict, layout: str, columns: Columns) -> bool:
    """A row a pair's prompt can be taken from. openai, sharegpt and helpsteer3 rows were detected by their
    own columns; the other layouts need a chosen or rejected column, or there is no pair at all (and an
    error about a missing 'chosen' would mislead: the prompt is what is missing)."""
    if layout not in ADAPTERS or is_unpaired(raw):
        return False
    return layout in ("openai", "sharegpt", "helpsteer3") or columns.chosen in raw or \
        columns.rejected in raw


def prompt_of(raw: Any, layout: str, columns: Columns) -> tuple[Any, dict | None]:
    """(prompt, template inputs or None) of one raw row; raises RowRejected."""
    if isinstance(raw, MalformedRow):
        raise RowRejected(raw.reason, f"{raw.file} line {raw.line}: {raw.error}")
    template = None
    if isinstance(raw, str) or is_messages(raw):
        value = raw
    elif isinstance(raw, dict):
        if columns.prompt in raw:
            value = raw[columns.prompt]
        elif _is_pair(raw, layout, columns):
            # a pair's prompt, as precompute reads it (openai / hh turns; TRL's implicit prompt: the common
            # start of chosen and rejected)
            value = normalise(raw, layout, columns)["prompt"]
        else:
            raise RowRejected("missing_field", f"no '{columns.prompt}' column, nor a chosen / rejected pair "
                                               f"to take the prompt from (the row has: "
                                               f"{', '.join(map(repr, list(raw)[:8]))}); --prompt-column names "
                                               "the column that holds it")
        template = {k: raw[k] for k in TEMPLATE_KEYS if raw.get(k) is not None} or None
        if template:
            check_template_inputs(dict(template))
    else:
        raise RowRejected("bad_type", f"row is {type(raw).__name__}, expected a prompt, messages or an object")
    if value is None:
        raise RowRejected("missing_field", f"'{columns.prompt}' is null")
    check_text("prompt", value)
    if is_blank(value):
        raise RowRejected("empty_prompt", "the prompt is empty or whitespace only")
    if template and not is_messages(value):
        template = None  # tools and template arguments only apply to a chat template
    return value, template


def _text_rows(url: str, options: dict | None) -> Iterator[tuple[int, Any]]:
    """A .txt file: one prompt per non-blank line (a line is the prompt, as written)."""
    check_exists(url, options)
    with storage.open_text(url, options) as fh:
        for index, line in enumerate(x.rstrip("\n").rstrip("\r") for x in fh if x.strip()):
            yield index, line


def _candidate_rows(url: str, prompt_column: str, options: dict | None) -> Iterator[tuple[int, Any]]:
    """generate's output: each candidate row's prompt as it was given (text, or messages with their
    template inputs), so earlier samples' prompts can be sampled again."""
    for index, rec in enumerate(read_candidates(url, options)[1]):
        prompt = json.loads(rec["prompt"]) if rec["conversational"] else rec["prompt"]
        yield index, {prompt_column: prompt, **json.loads(rec["template_json"] or "{}")}


def _rows(source: str, prompt_column: str, split: str, limit: int | None, options: dict | None) -> Iterator:
    path = resolve_source(source)
    if path.endswith(".txt"):
        rows: Iterator = _text_rows(path, options)
    elif output_kind(path, options) == "candidates":
        rows = _candidate_rows(path, prompt_column, options)
    else:
        return read_rows(source, split, limit, options)
    return rows if limit is None else itertools.islice(rows, limit)  # stops reading at the limit


def read_prompts(source: str, fmt: str, prompt_column: str, split: str, limit: int | None,
                 options: dict | None) -> Iterator[tuple[int, Any, dict | None, RowRejected | None, Any]]:
    """(source_index, prompt, template inputs, reject or None, raw row) for every input row, in order."""
    rows = _rows(source, prompt_column, split, limit, options)
    layout = None if fmt == "auto" else fmt
    layout = layout or embedded_layout(source)
    columns = Columns(prompt=prompt_column)
    for index, raw in rows:
        if layout is None and isinstance(raw, dict):
            layout = detect(raw)
        try:
            prompt, template = prompt_of(raw, layout or "standard", columns)
            yield index, prompt, template, None, raw
        except RowRejected as e:
            yield index, None, None, e, raw
