"""Tokenization exactly as trl 1.16.0's DPOTrainer does it, plus its collator's truncation.

TRL (`DPOTrainer._prepare_dataset`): standard completions get EOS appended; conversational rows go
through the chat template (the prompt with the generation prompt); the completion starts where the
tokenized prompt and the tokenized prompt+completion diverge. Truncation (`DataCollatorForPreference`)
cuts prompt+completion to max_length, keeping the start or the end. TRL silently drops rows whose
prompt alone fills max_length under keep_start; here they are rejects with a reason.
"""

from __future__ import annotations

import json
from typing import Any

from stages.core.inputs.formats import RowRejected, is_messages


def _common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def ids_of(tokenizer: Any, value: Any, **template_kwargs) -> list[int]:
    if isinstance(value, list):
        try:
            out = tokenizer.apply_chat_template(value, tokenize=True, return_dict=True, **template_kwargs)
        except Exception as e:  # noqa: BLE001  jinja and the template's own checks raise anything
            # What a template accepts depends on the model (content None, content parts, roles): a row
            # this one cannot render is rejected with the template's words, never the whole run lost.
            raise RowRejected("template_error", f"the chat template cannot render this row: "
                                                f"{type(e).__name__}: {str(e)[:300]}") from None
        return list(out["input_ids"])
    return list(tokenizer(text=value)["input_ids"])


def template_kwargs(row: dict | None) -> dict:
    """apply_chat_template's extra arguments from a row: its tools (a list, or JSON text of one) and
    chat_template_kwargs."""
    row = row or {}
    tools = row.get("tools")
    tools = json.loads(tools) if isinstance(tools, str) else tools
    return {"tools": tools, **(row.get("chat_template_kwargs") or {})}


def prompt_token_ids(tokenizer: Any, prompt: Any, template: dict | None = None) -> list[int]:
    """A prompt's tokens as `tokenize_row` makes them for the trainer: messages through the chat template
    with the generation prompt (and the row's tools / template arguments), a string as it is. Sampling
    from these tokens gives answers that continue exactly what the trainer will score."""
    if is_messages(prompt):
        return ids_of(tokenizer, prompt, add_generation_prompt=True, **template_kwargs(template))
    return ids_of(tokenizer, prompt)


def tokenize_row(tokenizer: Any, row: dict) -> dict[str, list[int]]:
    """TRL row (explicit prompt) -> untruncated prompt_ids / chosen_ids / rejected_ids."""
    prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
    if is_messages(chosen):
        kwargs = template_kwargs(row)
        prompt_ids = ids_of(tokenizer, prompt, add_generation_prompt=True, **kwargs)
        prompt_chosen = ids_of(tokenizer, prompt + chosen, **kwargs)
        prompt_rejected = ids_of(tokenizer, prompt + rejected, **kwargs)
    else:
        eos = tokenizer.eos_token
        chosen = chosen if chosen.endswith(eos) else chosen + eos
        rejected = rejected if rejected.endswith(eos) else rejected + eos
        prompt_ids = ids_of(tokenizer, prompt)
        prompt_chosen = ids_of(tokenizer, prompt + chosen)
        prompt_rejected = ids_of(tokenizer, prompt + rejected)
    # Tokens may merge across the prompt/completion boundary, or a template may render the prompt
    # alone differently: the completion starts where the two tokenizations part, as in TRL.
    n = min(_common_prefix_length(prompt_ids, prompt_chosen), _common_prefix_length(prompt_ids, prompt_rejected))
    return {"prompt_ids": prompt_ids[:n], "chosen_ids": prompt_chosen[n:], "rejected_ids": prompt_rejected[n:]}


def truncate(ids: dict[str, list[int]], max_length: int | None, max_prompt_length: int | None,
             truncation_mode: str) -> dict[str, list[int]]:
    """Drop the tokens TRL's collator would never score; raise RowRejected when nothing is left.

    keep_start: prompt + completion[: max_length - len(prompt)], so prompt_ids + chosen_ids is exactly
    the scored sequence. keep_end: the completion keeps its last max_length tokens; the prompt is kept
    whole here and `scored_sequence` cuts its start per completion, as the collator does.
    `max_prompt_length` (not in TRL 1.x; TRL 0.x semantics) first cuts the prompt at the same end.
    """
    prompt, chosen, rejected = ids["prompt_ids"], ids["chosen_ids"], ids["rejected_ids"]
    if max_prompt_length is not None and len(prompt) > max_prompt_length:
        prompt = prompt[:max_prompt_length] if truncation_mode == "keep_start" else prompt[-max_prompt_length:]
    if not prompt:
        raise RowRejected("empty_prompt", "the prompt tokenizes to no tokens")
    if not chosen or not rejected:
        raise RowRejected("empty_completion", "a completion tokenizes to no tokens")
    if max_length is not None:
        if truncation_mode == "keep_start":
            room = max_length - len(prompt)
            if room <= 0:
                raise RowRejected("prompt_too_long",
                                  f"prompt is {len(prompt)} tokens, leaving no room under max_length {max_length}")
            chosen, rejected = chosen[:room], rejected[:room]
        else:
            chosen, rejected = chosen[-max_length:], rejected[-max_length:]
    return {"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected}


def scored_sequence(prompt_ids: list[int], completion_ids: list[int], max_length: int | None,
                    truncation_mode: str) -> tuple[list[int], int]:
    """(input_ids, completion_start): the sequence TRL's collator builds, and where the completion starts.

    Tokens at positions >= completion_start (and > 0: the first token has no context) are scored.
    """
    seq = list(prompt_ids) + list(completion_ids)
    start = len(prompt_ids)
    if max_length is not None and len(seq) > max_length:
        if truncation_mode == "keep_start":
            seq = seq[:max_length]
        else:
            cut = len(seq) - max_length
            seq, start = seq[cut:], max(0, start - cut)
    return seq, start
