"""iterate's record of its rounds (OUTPUT/iterate.json) as types: what each finished stage of each round did.

The JSON layout is the one iterate has always written, so an output made by an older version resumes:

    {"model": ..., "reference": ..., "prompts": ..., "finished_at": ...,
     "rounds": {"1": {"generate": {...}, "judge": {...}, "precompute": {...}, "train": {...}, "eval": {...},
                      "samples": {"generate": {...}, "judge": {...}}}, ...}}

A stage's record is the dict its stage reported (counts, weights, figures) plus `finished_at`; its keys
differ by stage and grow with the stages, so they stay a mapping. The types are frozen: a change is a new
state (`with_stage`), which iterate writes at once.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

STAGES = ("generate", "judge", "precompute", "train", "eval")


@dataclass(frozen=True)
class RoundState:
    """Round k's finished stages by name, and (the last round of a run) its policy's own samples, judged."""

    stages: dict[str, dict] = field(default_factory=dict)
    samples: RoundState | None = None

    def get(self, name: str) -> dict:
        """A stage's record, {} when it has none."""
        return self.stages.get(name, {})

    def with_stage(self, name: str, record: dict) -> RoundState:
        """The round with `name` recorded; the stages after it dropped (they ran on what it replaced)."""
        later = STAGES[STAGES.index(name) + 1:]
        stages = {k: v for k, v in self.stages.items() if k not in later}
        return dataclasses.replace(self, stages={**stages, name: record})

    def finished(self, last: str) -> bool:
        return bool(self.get(last).get("finished_at"))

    def to_json(self) -> dict:
        out: dict[str, Any] = {name: self.stages[name] for name in STAGES if name in self.stages}
        return {**out, "samples": self.samples.to_json()} if self.samples is not None else out

    @classmethod
    def from_json(cls, data: dict) -> RoundState:
        samples = data.get("samples")
        return cls({k: v for k, v in data.items() if k in STAGES},
                   cls.from_json(samples) if samples is not None else None)


@dataclass(frozen=True)
class IterateState:
    """iterate.json: the settings an output's rounds were made with, and each round's record."""

    model: str | None = None
    reference: str | None = None
    prompts: str | None = None
    rounds: dict[int, RoundState] = field(default_factory=dict)
    finished_at: str | None = None

    def round(self, k: int) -> RoundState:
        return self.rounds.get(k, RoundState())

    def with_round(self, k: int, state: RoundState) -> IterateState:
        return dataclasses.replace(self, rounds={**self.rounds, k: state})

    def to_json(self) -> dict:
        out: dict[str, Any] = {"model": self.model, "reference": self.reference, "prompts": self.prompts,
                               "rounds": {str(k): self.rounds[k].to_json() for k in sorted(self.rounds)}}
        return {**out, "finished_at": self.finished_at} if self.finished_at else out

    @classmethod
    def from_json(cls, data: dict) -> IterateState:
        return cls(data.get("model"), data.get("reference"), data.get("prompts"),
                   {int(k): RoundState.from_json(v) for k, v in data.get("rounds", {}).items()},
                   data.get("finished_at"))
