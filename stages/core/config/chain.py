"""The chain commands, `run` (nightly) and `iterate`: their option classes, and the one way both build
their stages' configs (`Chain`).

A stage's config is the chain's settings every stage shares (`SHARED`), then what the chain gives that
stage, then the user's own options for it (`STAGE_options`), then the keys the chain sets itself (`owned`:
a stage's options may not set them). `Chain.check` builds every stage's config once before anything
runs, so a typo in `--train-options` fails before the first stage, not after a round of sampling.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Literal

from stages.core.config.engine import ConfigError, doc, from_mapping
from stages.core.config.online import Sampling
from stages.core.config.options import Common, Dtype, mappings, positive

# The chain's settings that every stage takes as they are.
SHARED = ("storage_options", "progress", "device", "gpu_wait_seconds", "dtype")
# Keys each chain sets itself in each stage: a stage's options may not set them.
RUN_OWNS = {"precompute": ("data", "model", "output"), "train": ("refs", "output", "resume"),
            "eval": ("refs", "model", "output")}
ITERATE_OWNS = {"generate": ("prompts", "model", "output"), "judge": ("candidates", "output"),
                "precompute": ("data", "model", "output", "append"), "train": ("refs", "model", "output", "resume"),
                "eval": ("refs", "model", "output")}


def utc_now() -> str:
    """A timestamp for records (run.json, iterate.json): UTC, to the second."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Chain:
    """How one chain command builds its stages' configs. `owned`: per stage, the keys the chain sets itself;
    `hint`: what the clash message adds (where the user sets those instead)."""

    cfg: Any
    owned: dict[str, tuple[str, ...]]
    who: str
    hint: str = ""

    def options(self, stage: str) -> dict:
        options = getattr(self.cfg, f"{stage}_options") or {}
        clash = sorted(set(options) & set(self.owned[stage]))
        if clash:
            raise ConfigError(f"config key '{stage}_options': {', '.join(clash)} are set by {self.who} itself"
                              + (f" ({self.hint})" if self.hint else ""))
        return options

    def build(self, cls: type, stage: str, values: dict, owned: dict) -> Any:
        """`cls` from the shared settings, `values` (the chain's for this stage), the user's options, `owned`."""
        shared = {k: getattr(self.cfg, k) for k in SHARED}
        return from_mapping(cls, {**shared, **values, **self.options(stage), **owned},
                            source=f"config key '{stage}_options'")


@dataclass(frozen=True)
class RunConfig(Common):
    """`pipeline.py run`: the nightly chain in one process (one Ray job): precompute, train, eval."""

    data: str = doc("input preference data (grows between runs: each run scores only the rows it has not seen)",
                    default="embedded:hh-rlhf-helpful")
    model: str = doc("reference model (and the policy's start unless train_options set model)",
                     default="embedded:smollm2-135m-instruct")
    refs: str = doc("precompute output, updated in place by every run (incremental)", group="output",
                    default="runs/nightly/refs")
    runs: str = doc("folder of the training runs: each run trains into RUNS/RUN_NAME", default="runs/nightly")
    run_name: str = doc("name of this run's folder; {date} is the run's date (UTC, YYYY-MM-DD)",
                        default="nightly-{date}")
    date: str | None = doc("the run's date, YYYY-MM-DD (default: today, UTC)", default=None)
    rerun: bool = doc("run a night again whose run finished (its run.json says so); without it such a run is "
                      "refused before anything is scored", group="output", default=False)
    eval_refs: str | None = doc("precompute output of a held-out set: evaluated after training", default=None)
    num_workers: int = doc("scorer actors and training workers", default=1)
    dtype: Dtype = doc("reference and compute dtype", default="float32")
    precompute_options: dict | None = doc("precompute keys for this chain, as JSON or a YAML mapping (not data, "
                                         "model, output)", default=None)
    train_options: dict | None = doc("train keys for this chain, as JSON or a YAML mapping (not refs, output, "
                                    "resume)", default=None)
    eval_options: dict | None = doc("eval keys for this chain, as JSON or a YAML mapping (not refs, model, output)",
                                   default=None)

    def check(self) -> None:
        super().check()
        positive(self, "num_workers")
        if self.date is not None and not re.fullmatch(r"\d{4}-\d{2}-\d{2}", self.date):
            raise ConfigError(f"config key 'date': expected YYYY-MM-DD, got {self.date!r}")
        try:
            name = self.run_name.format(date="2000-01-01")
        except (KeyError, IndexError, ValueError) as e:
            raise ConfigError(f"config key 'run_name': {self.run_name!r} may use only {{date}} ({e})") from None
        if not name or "/" in name or name in (".", ".."):
            raise ConfigError(f"config key 'run_name': {self.run_name!r} must name one folder")
        mappings(self, "precompute_options", "train_options", "eval_options")


@dataclass(frozen=True)
class IterateConfig(Sampling, Common):
    """`pipeline.py iterate`: K rounds of generate -> judge -> precompute -> train (-> eval)."""

    prompts: str = doc("prompts sampled every round (as generate's --prompts)",
                       default="embedded:hh-rlhf-helpful-prompts")
    model: str = doc("the initial (SFT) model: round 1 samples from it and starts training from it",
                     default="embedded:smollm2-135m-instruct")
    output: str = doc("folder or fsspec URL: OUTPUT/round-K/{candidates,pairs,refs,policy}, iterate.json, "
                      "summary.md, rounds.png", default="runs/online")
    rounds: int = doc("rounds to have run when this command ends (a re-run with more adds rounds)", default=2)
    new_rounds: int = doc("run at most this many rounds not yet finished, then stop (0: every round up to "
                          "--rounds); a scheduled job with --new-rounds 1 runs one round a night", default=0)
    reference: Literal["initial", "previous"] = doc(
        "reference of each round's precompute: initial (the initial model for all rounds: one refs output, each "
        "round scores and appends only its new pairs, training sees every round's pairs) or previous (last "
        "round's policy: each round its own refs and pairs)", default="initial")
    reward_model: str | None = doc("judge: a sequence-classification reward model", default=None)
    reward_fn: str | None = doc("judge: module:function or file.py:function, (prompt, response) -> float "
                                "(with no judge given: stages.rewards:concise)", default=None)
    pairs: Literal["best-worst", "all", "random"] = doc("pair selection, as judge's --pairs", default="best-worst")
    min_margin: float = doc("ties under this score difference are rejected, as judge's --min-margin", default=0.0)
    eval_refs: str | None = doc("precompute output of a held-out set (scored by the initial model): evaluated "
                                "after each round", default=None)
    score_final: bool = doc("after the last round of this run, sample and judge its policy once more (into "
                            "round-K/samples), for the summary's judge score", default=True)
    num_workers: int = doc("sampler, judge, scorer actors and training workers", default=1)
    dtype: Dtype = doc("model dtype in every stage", default="float32")
    generate_options: dict | None = doc("generate keys, JSON or a YAML mapping (not prompts, model, output)",
                                       default=None)
    judge_options: dict | None = doc("judge keys, JSON or a YAML mapping (not candidates, output)", default=None)
    precompute_options: dict | None = doc("precompute keys, JSON or a YAML mapping (not data, model, output)",
                                         default=None)
    train_options: dict | None = doc("train keys, JSON or a YAML mapping (not refs, model, output, resume)",
                                    default=None)
    eval_options: dict | None = doc("eval keys, JSON or a YAML mapping (not refs, model, output)", default=None)

    def check(self) -> None:
        super().check()
        self.check_sampling()
        positive(self, "rounds", "num_workers")
        if self.new_rounds < 0:
            raise ConfigError(f"config key 'new_rounds': must be 0 (all) or positive, got {self.new_rounds}")
        if self.reward_model and self.reward_fn:
            raise ConfigError("iterate: give one judge, --reward-model or --reward-fn, not both")
        mappings(self, "generate_options", "judge_options", "precompute_options", "train_options", "eval_options")
