"""Tokenization exactly as trl 1.16.0's DPOTrainer does it (untruncated: its collator's truncation is
`stages.core.scoring.truncation.Truncation`, which scoring and training both apply).

TRL (`DPOTrainer._prepare_dataset`): standard completions get EOS appended; conversational rows go
through the chat template (the prompt with the generation prompt); the completion starts where the
tokenized prompt and the tokenized prompt+completion diverge.
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

