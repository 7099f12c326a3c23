"""The option classes of the online commands, `generate` and `judge`, and the sampling settings they
share with `iterate` (`chain.py`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from stages.core.config.engine import ConfigError, doc
from stages.core.config.options import Common, Dtype, check_limit, positive


@dataclass(frozen=True)
class Sampling:
    """How candidates are sampled: shared by generate and iterate."""

    num_samples: int = doc("responses sampled per prompt", default=4)
    temperature: float = doc("sampling temperature (0: greedy, then every sample is the same)", default=0.8)
    top_p: float = doc("nucleus sampling: the smallest set of tokens holding this much probability", default=1.0)
    max_new_tokens: int = doc("most new tokens per response (a response cut here has finish reason 'length')",
                              default=256)
    seed: int = doc("sampling seed: each (prompt, sample) draws from its own generator seeded by it, so the same "
                    "command gives the same samples", default=0)

    def check_sampling(self) -> None:
        positive(self, "num_samples", "max_new_tokens")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ConfigError("config keys 'temperature', 'top_p': need temperature >= 0 and 0 < top_p <= 1 "
                              f"(got {self.temperature}, {self.top_p})")


@dataclass(frozen=True)
class GenerateConfig(Sampling, Common):
    """`pipeline.py generate`: prompts in, N sampled responses per prompt out."""

    prompts: str = doc("prompts: any input precompute reads (its prompt is used), prompt-only rows, or a plain "
                       "list of prompts / message lists (JSON, JSON Lines, .txt one per line)",
                       default="embedded:hh-rlhf-helpful-prompts")
    model: str = doc("model that samples: local dir, hub name, or 'embedded:smollm2-135m-instruct'",
                     default="embedded:smollm2-135m-instruct")
    output: str = doc("output folder or fsspec URL: candidates-*.parquet, rejects.jsonl, manifest.json",
                      default="runs/online/candidates")
    format: str = doc("input layout, as precompute's --format (auto detects)", default="auto")
    prompt_column: str = doc("column holding the prompt", default="prompt")
    split: str = doc("split to read from a DatasetDict / hub dataset", default="train")
    limit: int | None = doc("read only the first N prompts", default=None)
    batch_size: int = doc("prompts per sampler call (each with its num_samples responses)", default=8)
    num_workers: int = doc("sampler actors (one GPU each where CUDA exists)", default=1)
    dtype: Dtype = doc("model dtype", default="float32")
    engine: Literal["auto", "hf", "vllm"] = doc("hf: transformers generate with left padding; vllm: a vLLM "
                                                "engine (needs vllm and a GPU); auto: vllm when both exist",
                                                default="auto")
    rows_per_file: int = doc("prompts per output Parquet file", default=1000)
    overwrite: bool = doc("replace an output generated with other settings", default=False)

    def check(self) -> None:
        super().check()
        self.check_sampling()
        positive(self, "batch_size", "num_workers", "rows_per_file")
        check_limit(self.limit, "prompts")


@dataclass(frozen=True)
class JudgeConfig(Common):
    """`pipeline.py judge`: candidates in, preference pairs out."""

    candidates: str = doc("generate's output folder (candidates-*.parquet + manifest.json)",
                          default="runs/online/candidates")
    output: str = doc("output folder: pairs.jsonl (precompute's input), scores.jsonl, rejects.jsonl, manifest.json",
                      default="runs/online/pairs")
    reward_model: str | None = doc("judge: a sequence-classification reward model (one logit), local dir or "
                                   "hub name", default=None)
    reward_fn: str | None = doc("judge: a Python callable (prompt, response) -> float, as module:function or "
                                "path/to/file.py:function", default=None)
    labels: str | None = doc("judge: a sheet written by --export-sheet, marked A, B or tie by people", default=None)
    implicit: str | None = doc("judge: a trained policy whose DPO implicit reward beta * log(pi/pi_ref) scores "
                               "each response (needs --refs for the reference)", default=None)
    refs: str | None = doc("with --implicit: a precompute output; its reference model and settings are used",
                           group="judge", default=None)
    beta: float | None = doc("with --implicit: beta of the implicit reward (default: the policy's run, else 0.1)",
                             group="judge", default=None)
    export_sheet: str | None = doc("write a labelling sheet (.csv or .jsonl) of prompt, response A, response B "
                                   "(order randomised and recorded) instead of judging", default=None)
    pairs: Literal["best-worst", "all", "random"] = doc(
        "pairs per prompt: best-worst (highest vs lowest score), all (every ordered pair apart by min_margin), "
        "random (two distinct responses)", default="best-worst")
    min_margin: float = doc("a pair whose score difference is below this (or zero) is a tie, rejected",
                            default=0.0)
    missing_eos_penalty: float = doc("subtracted from the score of a response cut at max_new_tokens "
                                     "(finish reason 'length'), as TRL's online DPO", default=0.0)
    seed: int = doc("seed of --pairs random and of the sheet's A/B order", group="judge", default=0)
    batch_size: int = doc("responses per reward-model / policy call", default=16)
    num_workers: int = doc("judge actors (reward model or implicit reward)", default=1)
    # Not `max_length`: in precompute and train that key is a Truncation of prompt + answer to the scored
    # sequence; here it is only how much of one answer a reward model reads.
    reward_max_tokens: int = doc("most tokens of prompt + response a reward model reads (longer: cut at the "
                                 "start's end, keep_start)", group="judge", default=2048)
    RENAMED: ClassVar[dict[str, str]] = {"max_length": "reward_max_tokens"}
    dtype: Dtype = doc("dtype of the reward model / policy", default="float32")
    overwrite: bool = doc("replace an output judged with other settings", default=False)

    def check(self) -> None:
        super().check()
        positive(self, "batch_size", "num_workers", "reward_max_tokens")
        if self.min_margin < 0 or self.missing_eos_penalty < 0:
            raise ConfigError("config keys 'min_margin', 'missing_eos_penalty': must be 0 or more "
                              f"(got {self.min_margin}, {self.missing_eos_penalty})")
        judges = [k for k in ("reward_model", "reward_fn", "labels", "implicit") if getattr(self, k)]
        if self.export_sheet:
            if judges:
                raise ConfigError(f"config key 'export_sheet': writes a sheet to label; it takes no judge "
                                  f"(got {', '.join(judges)})")
        elif len(judges) > 1:  # none at all is refused when the stage runs (the defaults must construct)
            raise ConfigError("judge: give exactly one of --reward-model, --reward-fn, --labels, --implicit "
                              f"(or --export-sheet); got {', '.join(judges)}")
        if self.implicit and not self.refs:
            raise ConfigError("config key 'implicit': needs --refs (a precompute output: its reference model)")
        if self.beta is not None and self.beta <= 0:
            raise ConfigError(f"config key 'beta': must be positive, got {self.beta}")

    @property
    def judge(self) -> str:
        for key in ("reward_model", "reward_fn", "labels", "implicit"):
            if getattr(self, key):
                return key
        return "sheet"


