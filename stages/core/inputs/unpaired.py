"""Unpaired preference rows (KTO) -> TRL's rows {"prompt", "completion", "label"}, tokenized as trl 1.16.0 does.

Input layout (TRL's "unpaired preference" type): `prompt`, `completion` (both strings, or both message lists)
and `label` (True: desirable, False: undesirable). Paired rows become unpaired rows with `unpair`, as
`trl.data_utils.unpair_preference_dataset` does.

What trl 1.16.0's `KTOTrainer._prepare_dataset` does, in order, and where it lives here:

1. If the first row has no `prompt`: `extract_prompt` (chosen/rejected's common prefix). That only works on
   paired rows; an unpaired row without a prompt raises KeyError('chosen') in TRL. So there is no implicit
   prompt for unpaired rows: `normalise_unpaired` rejects them (`missing_field`). Paired rows go through
   `formats.normalise` (which extracts the prompt as TRL does) and then `unpair`. Unlike DPO's
   `maybe_extract_prompt`, KTO keeps a string `prompt` next to conversational chosen/rejected (the
   UltraFeedback layout) and then tokenizes a mixed row; `formats.normalise` drops that prompt and extracts
   it from the conversations instead, which is the only sane reading, so that layout is not bit-for-bit TRL.
2. Paired rows: `unpair_preference_dataset` (`unpair` / `unpair_rows`).
3. Standard (string) rows: EOS appended to the completion unless it already ends with it
   (`tokenize_unpaired_row`). Conversational rows: nothing appended, the chat template ends the turn.
4. Tokenization: conversational prompt with the generation prompt, prompt+completion without; strings
   tokenized as they are (`tokenizer(text=...)`, so BOS only if the tokenizer adds one, to both). The
   completion starts where the two token lists part (`tokenize_unpaired_row`), as for DPO.
5. With max_length set, rows whose prompt alone has >= max_length tokens are dropped (here: rejected,
   `prompt_too_long`, in `Truncation.cut_unpaired`, stages.core.scoring.truncation).
6. KL completions, see `trl_kl_partners`.

Truncation (`DataCollatorForUnpairedPreference`): prompt_ids + completion_ids cut to max_length from the right,
per sequence. KTOConfig 1.16.0 has no truncation_mode, no max_prompt_length and no max_completion_length (those
were TRL 0.x's). `Truncation.cut_unpaired` reproduces keep_start exactly and, like `Truncation.cut` on the DPO
path, also offers keep_end and a max_prompt_length, which are this tool's extensions, not TRL KTO's.
`Truncation.scored_sequence(prompt_ids, completion_ids)` then gives the scored sequence, as for DPO.
"""

from __future__ import annotations

from typing import Any

from stages.core.inputs.formats import (
    DEFAULT_COLUMNS,
    Columns,
    RowRejected,
    check_template_inputs,
    check_text,
    is_blank,
    is_messages,
)
from stages.core.inputs.tokenization import tokenize_row

# TRL map(batched=True) default: `unpair_preference_dataset` works on blocks of this many paired rows.
TRL_MAP_BATCH_SIZE = 1000

_TRUE_STRINGS = {"true", "1"}
_FALSE_STRINGS = {"false", "0"}


def is_unpaired(row: Any, columns: Columns = DEFAULT_COLUMNS) -> bool:
    """Whether a raw row is in the unpaired layout (format=auto): completion and label, no chosen / rejected."""
    if not isinstance(row, dict):
        return False
    c = columns
    return c.completion in row and c.label in row and c.chosen not in row and c.rejected not in row


def parse_label(value: Any, column: str = "label") -> bool:
    """A label as a bool: True/False, the ints 1/0, or the strings true/false/1/0 (any case, spaces around).

    TRL wants a bool column; ints 0/1 also work there (its loss casts them to bool). The strings are what a
    CSV file holds (this tool's CSV reader yields text), and the values `datasets`' CSV loader would turn into
    bools or 0/1 ints for TRL. Anything else is `bad_label`, with the value in the detail.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE_STRINGS | _FALSE_STRINGS:
        return value.strip().lower() in _TRUE_STRINGS
    raise RowRejected("bad_label", f"{column} is {value!r} ({type(value).__name__}), expected true/false or 1/0")


def normalise_unpaired(row: dict, columns: Columns) -> dict:
    """Raw unpaired row -> {"prompt", "completion", "label": bool} (+ tools / chat_template_kwargs); RowRejected.

    Reasons, as in `formats.normalise`: missing_field, bad_type (not a string or messages; prompt and completion
    mixing the two; bad tools / chat_template_kwargs), empty_prompt, empty_completion; plus bad_label.
    """
    if not isinstance(row, dict):
        raise RowRejected("bad_type", f"row is {type(row).__name__}, expected an object")
    prompt_col, completion_col, label_col = columns.prompt, columns.completion, columns.label
    out: dict[str, Any] = {}
    if row.get(prompt_col) is None:
        raise RowRejected("missing_field", f"no '{prompt_col}' value: unpaired rows need an explicit prompt "
                                           "(TRL's KTOTrainer extracts a prompt only from chosen/rejected pairs)")
    out["prompt"] = row[prompt_col]
    if row.get(completion_col) is None:
        raise RowRejected("missing_field", f"no '{completion_col}' value")
    out["completion"] = row[completion_col]
    if row.get(label_col) is None:
        raise RowRejected("missing_field", f"no '{label_col}' value")
    out["label"] = parse_label(row[label_col], label_col)
    for key in ("tools", "chat_template_kwargs"):
        if row.get(key) is not None:
            out[key] = row[key]
    for key in ("prompt", "completion"):
        check_text(key, out[key])
    check_template_inputs(out)
    if is_messages(out["prompt"]) != is_messages(out["completion"]):
        raise RowRejected("bad_type", "prompt and completion mix strings and messages")
    if is_blank(out["completion"]):
        raise RowRejected("empty_completion", "completion is empty or whitespace only")
    if len(out["prompt"]) == 0:
        raise RowRejected("empty_prompt", "the prompt is empty: the first completion token has no context")
    return out


def unpair(row: dict) -> list[dict]:
    """A normalised paired row -> [chosen as label True, rejected as label False], other keys on both.

    Row for row what `trl.data_utils.unpair_preference_dataset` makes. Its dataset order differs: TRL maps
    blocks of rows, each block giving all its chosen rows, then all its rejected rows; see `unpair_rows`.
    """
    extra = {k: v for k, v in row.items() if k not in ("prompt", "chosen", "rejected")}
    prompt = {"prompt": row["prompt"]} if "prompt" in row else {}
    return [{**prompt, "completion": row["chosen"], "label": True, **extra},
            {**prompt, "completion": row["rejected"], "label": False, **extra}]


def unpair_rows(rows: list[dict], batch_size: int = TRL_MAP_BATCH_SIZE) -> list[dict]:
    """Paired rows -> unpaired rows in `unpair_preference_dataset`'s order (map with `batch_size`).

    Per block of `batch_size` paired rows: the block's chosen rows, then its rejected rows. The order
    matters for KTO: the KL completions are taken from neighbours (`trl_kl_partners`). With dataset_num_proc > 1
    TRL maps each contiguous shard separately, so its blocks restart at shard boundaries.
    """
    out: list[dict] = []
    for start in range(0, len(rows), batch_size):
        pairs = [unpair(r) for r in rows[start:start + batch_size]]
        out.extend(p[0] for p in pairs)
        out.extend(p[1] for p in pairs)
    return out


def tokenize_unpaired_row(tokenizer: Any, row: dict) -> dict[str, list[int]]:
    """TRL unpaired row (explicit prompt) -> untruncated prompt_ids / completion_ids, as KTOTrainer's tokenize_fn.

    A template that cannot render the row is a `template_error` reject (as on the DPO path). TRL may leave the
    prompt with no tokens (they merged into the completion): that is `Truncation.cut_unpaired`'s empty_prompt.
    """
    # KTOTrainer's tokenize_fn is DPOTrainer's for one completion: the pair rule with the completion twice.
    ids = tokenize_row(tokenizer, {**row, "chosen": row["completion"], "rejected": row["completion"]})
    return {"prompt_ids": ids["prompt_ids"], "completion_ids": ids["chosen_ids"]}


def trl_kl_partners(n: int, batch_size: int) -> list[int]:
    """For each of n rows, the row whose completion TRL pairs with its prompt for the KL term.

    trl 1.16.0 (`_prepare_dataset`, after tokenizing and after dropping too-long prompts, so positions are
    those of the kept rows) maps the dataset in blocks of `per_device_train_batch_size` rows (also for eval
    datasets) and rotates the completions by one inside each block: row i gets the completion of row i-1,
    the block's first row that of its last. A last, shorter block rotates within itself; a block of one row
    gets its own completion. The KL sequence is prompt_ids + KL_completion_ids, truncated by the collator like
    the main one. Training must then read the rows in this order (TRL forces a sequential sampler), in batches
    of exactly that size. With dataset_num_proc > 1, TRL maps each contiguous shard separately, so blocks
    restart at shard boundaries; this function assumes one process. loss_type "apo_zero_unpaired" has no KL term.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out = []
    for i in range(n):
        start = i - i % batch_size
        size = min(batch_size, n - start)
        out.append(start + (i - start - 1) % size)
    return out
