"""The truncation setting, one type: what precompute scored with, what the manifest records, what
training and the judges must score with again (TRL's collator: max_length, keep_start | keep_end)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Truncation:
    max_length: int | None = 1024        # tokens of prompt + completion (None: no limit)
    max_prompt_length: int | None = None  # prompt tokens before max_length applies (None: no limit)
    mode: str = "keep_start"              # keep_start | keep_end: which end of a too-long sequence stays

    def to_json(self) -> dict:
        """The manifest's flat keys (a contract: max_length, max_prompt_length, truncation_mode)."""
        return {"max_length": self.max_length, "max_prompt_length": self.max_prompt_length,
                "truncation_mode": self.mode}

    @classmethod
    def from_json(cls, values: dict) -> Truncation:
        return cls(values.get("max_length"), values.get("max_prompt_length"),
                   values.get("truncation_mode", "keep_start"))
