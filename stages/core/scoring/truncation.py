"""The truncation setting, one type: what precompute scored with, what the manifest records, what
training and the judges must score with again — and the rules themselves, as trl 1.16.0's collators
apply them (`DataCollatorForPreference`, `DataCollatorForUnpairedPreference`: prompt + completion cut to
max_length, keeping the start or the end).

Two steps, as in TRL: `cut` / `cut_unpaired` drop, once per row, the tokens the collator would never
score (and reject a row with nothing left: TRL silently drops a prompt that fills max_length under
keep_start); `scored_sequence` then builds, per completion, the sequence that is scored. It lives in
scoring, not with the tokenizer in inputs, because scoring and training both apply it.
"""

from __future__ import annotations

from dataclasses import dataclass

from stages.core.inputs.formats import RowRejected

MODES = ("keep_start", "keep_end")


@dataclass(frozen=True)
class Truncation:
    max_length: int | None = 1024        # tokens of prompt + completion (None: no limit)
    max_prompt_length: int | None = None  # prompt tokens before max_length applies (None: no limit)
    mode: str = "keep_start"              # keep_start | keep_end: which end of a too-long sequence stays

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"truncation_mode must be keep_start or keep_end, got {self.mode!r}")

    def to_json(self) -> dict:
        """The manifest's flat keys (a contract: max_length, max_prompt_length, truncation_mode)."""
        return {"max_length": self.max_length, "max_prompt_length": self.max_prompt_length,
                "truncation_mode": self.mode}

    @classmethod
    def from_json(cls, values: dict) -> Truncation:
        return cls(values.get("max_length"), values.get("max_prompt_length"),
                   values.get("truncation_mode", "keep_start"))

    def cut(self, ids: dict[str, list[int]]) -> dict[str, list[int]]:
        """prompt_ids / chosen_ids / rejected_ids without the tokens TRL's collator would never score;
        RowRejected when nothing is left.

        keep_start: prompt + completion[: max_length - len(prompt)], so prompt_ids + chosen_ids is exactly
        the scored sequence. keep_end: the completion keeps its last max_length tokens; the prompt is kept
        whole here and `scored_sequence` cuts its start per completion, as the collator does.
        `max_prompt_length` (not in TRL 1.x; TRL 0.x semantics) first cuts the prompt at the same end.
        """
        prompt, chosen, rejected = ids["prompt_ids"], ids["chosen_ids"], ids["rejected_ids"]
        limit = self.max_prompt_length
        if limit is not None and len(prompt) > limit:
            prompt = prompt[:limit] if self.mode == "keep_start" else prompt[-limit:]
        if not prompt:
            raise RowRejected("empty_prompt", "the prompt tokenizes to no tokens")
        if not chosen or not rejected:
            raise RowRejected("empty_completion", "a completion tokenizes to no tokens")
        if self.max_length is not None:
            if self.mode == "keep_start":
                room = self.max_length - len(prompt)
                if room <= 0:
                    raise RowRejected("prompt_too_long", f"prompt is {len(prompt)} tokens, leaving no room under "
                                                         f"max_length {self.max_length}")
                chosen, rejected = chosen[:room], rejected[:room]
            else:
                chosen, rejected = chosen[-self.max_length:], rejected[-self.max_length:]
        return {"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected}

    def cut_unpaired(self, ids: dict[str, list[int]]) -> dict[str, list[int]]:
        """prompt_ids / completion_ids of an unpaired (KTO) example, cut as TRL's KTO collator would score them.

        keep_start (TRL KTO's only mode): rows whose prompt has >= max_length tokens are dropped by TRL, rejected
        here as prompt_too_long; otherwise prompt + completion[: max_length - len(prompt)], exactly the collator's
        sequence. keep_end (this tool's extension, as on the DPO path): the completion keeps its last max_length
        tokens, the prompt is kept whole and `scored_sequence` cuts its start. `max_prompt_length` (not in TRL
        1.x) first cuts the prompt at the same end, as `cut` does; TRL 0.x's KTO cut the prompt only when
        prompt + completion exceeded max_length, and had a max_completion_length.
        """
        # The pair rule with the completion in both places: the same cuts and rejects as the DPO path.
        out = self.cut({"prompt_ids": ids["prompt_ids"], "chosen_ids": ids["completion_ids"],
                        "rejected_ids": ids["completion_ids"]})
        return {"prompt_ids": out["prompt_ids"], "completion_ids": out["chosen_ids"]}

    def scored_sequence(self, prompt_ids: list[int], completion_ids: list[int]) -> tuple[list[int], int]:
        """(input_ids, completion_start): the sequence TRL's collator builds, and where the completion starts.

        Tokens at positions >= completion_start (and > 0: the first token has no context) are scored.
        """
        seq = list(prompt_ids) + list(completion_ids)
        start = len(prompt_ids)
        if self.max_length is not None and len(seq) > self.max_length:
            if self.mode == "keep_start":
                seq = seq[:self.max_length]
            else:
                cut = len(seq) - self.max_length
                seq, start = seq[cut:], max(0, start - cut)
        return seq, start
