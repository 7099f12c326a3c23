"""Typed stage configs: frozen dataclasses, a YAML file, CLI flags that win over it.

Precedence is defaults < YAML (`--config FILE.yaml`) < CLI flags. Every field becomes a flag
(`max_length` -> `--max-length`) whose help is the field's one-line doc. Unknown keys and values
of the wrong type are errors that name the key, raised in the driver before any Ray worker starts.
Each class checks its own ranges in `check()`, run on construction.

This module is the bottom of the import graph: it imports no other module of the project, so
the loss names and the storage-option rules it checks are declared here and the modules that
implement them are tested against these declarations.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from stages.core.errors import PipelineError


class ConfigError(PipelineError, ValueError):
    """A bad config key or value; the message names the key."""


def doc(help_text: str, group: str | None = None, **kwargs: Any) -> Any:
    """A dataclass field with its one-line help; `group` where its --help group is not its name's
    (`FIELD_GROUPS`): a key that means something else in one command (judge's --seed)."""
    return field(metadata={"help": help_text, **({"group": group} if group else {})}, **kwargs)


# The loss family by name; `stages.core.training.losses.LOSSES` implements exactly these (a test holds them equal).
LOSS_NAMES = ("sigmoid", "robust", "hinge", "ipo", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sigmoid_norm", "sft", "simpo", "orpo")
# Losses on unpaired examples (KTO shards); `stages.core.training.unpaired_losses.UNPAIRED_LOSSES` implements these.
UNPAIRED_LOSS_NAMES = ("kto", "apo_zero_unpaired")
Dtype = Literal["float32", "bfloat16"]
_SECRET_WORDS = ("key", "secret", "token", "password", "credential", "session")


def parse_loss_types(loss_type: str, loss_weights: str | None) -> list[tuple[str, float]]:
    """'sigmoid,sft' + '1,0.2' -> [('sigmoid', 1.0), ('sft', 0.2)]; errors name the bad entry."""
    names = [n.strip() for n in loss_type.split(",") if n.strip()]
    unknown = [n for n in names if n not in LOSS_NAMES + UNPAIRED_LOSS_NAMES]
    if not names or unknown:
        raise ConfigError(f"config key 'loss_type': unknown loss {', '.join(unknown) or repr(loss_type)}; "
                          f"choose from {', '.join(LOSS_NAMES)} (pairs) or {', '.join(UNPAIRED_LOSS_NAMES)} "
                          "(unpaired examples)")
    unpaired = [n for n in names if n in UNPAIRED_LOSS_NAMES]
    if unpaired and len(names) > 1:
        raise ConfigError(f"config key 'loss_type': {', '.join(unpaired)} (unpaired examples) cannot be combined "
                          "with other losses")
    if loss_weights in (None, ""):
        return [(n, 1.0) for n in names]
    try:
        weights = [float(w) for w in str(loss_weights).split(",")]
    except ValueError:
        raise ConfigError(f"config key 'loss_weights': {loss_weights!r} is not a list of numbers") from None
    if len(weights) != len(names):
        raise ConfigError(f"config key 'loss_weights': {len(weights)} weights for {len(names)} losses")
    return list(zip(names, weights))


def parse_storage_options(options_json: str | None) -> dict:
    """The `--storage-options` JSON as a dict ({} when unset)."""
    return parse_options("storage_options", options_json)


def redact(value: Any) -> Any:
    """A copy with every value under a secret-looking key replaced, for logs and written configs."""
    if isinstance(value, dict):
        return {k: "<redacted>" if any(w in str(k).lower() for w in _SECRET_WORDS) else redact(v)
                for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value


def _check_limit(limit: int | None, reads: str) -> None:
    """--limit N reads the first N rows; 0 would read nothing, which can only be a mistake."""
    if limit is not None and limit <= 0:
        raise ConfigError(f"config key 'limit': --limit {limit} reads no {reads}; give 1 or more, or leave it out "
                          f"to read every one")


def _positive(cfg: Any, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if value is not None and value <= 0:
            raise ConfigError(f"config key '{name}': must be positive, got {value}")


@dataclass(frozen=True)
class Common:
    """Fields every stage has."""

    storage_options: str | None = doc("JSON of fsspec options (endpoint, profile, ...); secrets are never written",
                                      default=None)
    progress: bool = doc("show a progress bar", default=True)
    device: Literal["auto", "cuda", "cpu"] = doc(
        "auto: a GPU where the cluster has one now (the choice and why are printed); cuda: ask Ray for GPUs "
        "(an autoscaler adds GPU nodes), never fall back to the CPU; cpu: never use a GPU", default="auto")
    gpu_wait_seconds: float = doc("how long --device cuda waits for the Ray cluster's GPUs before failing",
                                  default=600.0)

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        parse_storage_options(self.storage_options)
        _positive(self, "gpu_wait_seconds")

    @property
    def storage_options_dict(self) -> dict:
        return parse_storage_options(self.storage_options)


@dataclass(frozen=True)
class PrecomputeConfig(Common):
    data: str = doc("input: file, directory, save_to_disk dir, fsspec URL, or hub name",
                    default="embedded:hh-rlhf-helpful")
    model: str = doc("reference model: local dir, hub name, or 'embedded:smollm2-135m-instruct'",
                     default="embedded:smollm2-135m-instruct")
    output: str = doc("output directory or fsspec URL for shards, rejects and manifest.json", default="runs/demo")
    format: Literal["auto", "standard", "hh", "ultrafeedback", "helpsteer3", "openai", "sharegpt", "unpaired"] = doc(
        "input layout; auto detects openai/sharegpt/helpsteer3 and unpaired (prompt, completion, label: KTO) "
        "rows and otherwise reads TRL's standard or conversational pairs as-is (hh text is only parsed into "
        "turns with --format hh)", default="auto")
    prompt_column: str = doc("column holding the prompt (optional: implicit prompts are extracted)", default="prompt")
    chosen_column: str = doc("column holding the chosen answer", default="chosen")
    rejected_column: str = doc("column holding the rejected answer", default="rejected")
    completion_column: str = doc("column holding the completion of an unpaired example", default="completion")
    label_column: str = doc("column holding an unpaired example's label (true: desirable)", default="label")
    unpair: bool = doc("turn each pair into two unpaired examples (chosen: desirable, rejected: undesirable; "
                       "source_index 2i and 2i+1), as TRL's unpair_preference_dataset, for KTO", default=False)
    kl_seed: int = doc("seed of the KL pairing of unpaired examples (each with another example's completion "
                       "of its shard)", default=0)
    split: str = doc("split to read from a DatasetDict / hub dataset", default="train")
    max_length: int | None = doc("max tokens of prompt+completion, TRL's max_length (None: no limit)", default=1024)
    max_prompt_length: int | None = doc("max prompt tokens before max_length applies (None: no limit)", default=None)
    truncation_mode: Literal["keep_start", "keep_end"] = doc("which end of a too-long sequence to keep",
                                                             default="keep_start")
    batch_size: int = doc("pairs per scorer call (cut by length into forwards inside the call)", default=64)
    num_workers: int = doc("scorer actors (one GPU each where CUDA exists)", default=1)
    gpus_per_worker: int = doc("GPUs of one node per scorer actor: a reference too big for one GPU is spread "
                               "over K GPUs (device_map); needs CUDA when above 1", default=1)
    dtype: Dtype = doc("reference model dtype", default="float32")
    pack_prompts: bool = doc("score each prompt once for both answers (packed rows, 4D mask)", default=True)
    rows_per_shard: int = doc("new input rows per output shard: each run groups the rows it has not seen "
                              "before, in input order, into shards of this many", default=1000)
    limit: int | None = doc("read only the first N input rows", default=None)
    overwrite: bool = doc("replace an existing output made with other settings", default=False)
    append: bool = doc("add rows of another --data to an output that holds a different data set", default=False)

    def check(self) -> None:
        super().check()
        _positive(self, "batch_size", "num_workers", "gpus_per_worker", "rows_per_shard", "max_length",
                  "max_prompt_length")
        _check_limit(self.limit, "input rows")
        ml, mpl = self.max_length, self.max_prompt_length
        if ml is not None and mpl is not None and mpl >= ml:
            raise ConfigError(f"config key 'max_prompt_length': {mpl} leaves no room under max_length {ml}")


@dataclass(frozen=True)
class PolicyPass(Common):
    """What a pass of the policy over shard pairs needs: the loss, its parameters, batching, dtype."""

    loss_type: str = doc("loss or comma list: " + ", ".join(LOSS_NAMES) + "; on unpaired shards (KTO examples): "
                         + " or ".join(UNPAIRED_LOSS_NAMES), default="sigmoid")
    loss_weights: str | None = doc("comma list of weights, one per loss (default: all 1)", default=None)
    beta: float = doc("KL strength beta (IPO tau, ORPO lambda)", default=0.1)
    label_smoothing: float = doc("assumed label-flip rate for robust / exo_pair / aot / simpo", default=0.0)
    discopop_tau: float = doc("DiscoPOP temperature", default=0.05)
    simpo_gamma: float = doc("SimPO target reward margin gamma, in the units of beta * average log-prob",
                             default=0.5)
    desirable_weight: float = doc("KTO: weight of each desirable example's loss (lambda_D)", default=1.0)
    undesirable_weight: float = doc("KTO: weight of each undesirable example's loss (lambda_U)", default=1.0)
    micro_batch_size: int = doc("pairs per forward/backward on one worker", default=2)
    dtype: Dtype = doc("compute dtype (bfloat16: autocast over float32 weights)", default="float32")
    pack_prompts: bool = doc("run each prompt once for both answers (packed rows, 4D mask): fewer tokens, "
                             "less activation memory, same values", default=True)

    def check(self) -> None:
        super().check()
        _positive(self, "micro_batch_size", "discopop_tau", "desirable_weight", "undesirable_weight")
        # The sweep's beta is a list (checked there); eval's may be unset (the run's, filled in by eval).
        if isinstance(self.beta, float) and self.beta <= 0:
            raise ConfigError(f"config key 'beta': must be positive, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"config key 'label_smoothing': must be in [0, 0.5), got {self.label_smoothing}")
        if self.loss_type is not None:
            parse_loss_types(self.loss_type, self.loss_weights)

    @property
    def loss_terms(self) -> list[tuple[str, float]]:
        return parse_loss_types(self.loss_type, self.loss_weights)


@dataclass(frozen=True)
class TrainConfig(PolicyPass):
    refs: str = doc("precompute output (shards + manifest.json), local or fsspec URL", default="runs/demo")
    model: str | None = doc("policy initialisation (default: the manifest's reference model)", default=None)
    output: str | None = doc("run folder: metrics, checkpoints, final/ (default: REFS/policy)", default=None)
    learning_rate: float = doc("peak AdamW learning rate", default=5e-6)
    weight_decay: float = doc("AdamW weight decay", default=0.0)
    lr_scheduler: Literal["linear", "cosine", "constant"] = doc("decay after warmup", default="linear")
    warmup_ratio: float = doc("fraction of steps spent warming up", default=0.1)
    batch_size: int = doc("pairs per optimizer step (global, over all workers)", group="training", default=8)
    max_steps: int | None = doc("optimizer steps (wins over epochs)", default=None)
    epochs: int = doc("passes over the shards when max_steps is unset", default=1)
    max_grad_norm: float = doc("gradient clipping norm (0: off)", default=1.0)
    stop_at_step: int | None = doc("end this invocation after this step, with a checkpoint (the schedule still "
                                   "spans max_steps/epochs): time-sliced or preemptible jobs resume with --resume",
                                   default=None)
    save_every: int = doc("write checkpoints/step-N every N steps (0: never)", default=0)
    keep_checkpoints: int = doc("how many recent checkpoints to keep", default=2)
    resume: Literal["false", "true", "auto"] = doc(
        "continue from the latest checkpoint in OUTPUT: true (error if none), auto (if one exists: for "
        "re-submitted or pre-empted jobs), false", default="false")
    eval_refs: str | None = doc("precompute output of a held-out set, evaluated every eval_every steps", default=None)
    eval_every: int = doc("steps between evaluations (0: only at the end, when eval_refs is set)", default=0)
    early_stopping_patience: int = doc("stop after this many evaluations without improvement (0: off); "
                                       "the best weights are kept in OUTPUT/best", default=0)
    early_stopping_metric: Literal["eval/loss", "eval/rewards/accuracies", "eval/rewards/margins"] = doc(
        "what early stopping watches (loss: lower is better; the others: higher)", default="eval/loss")
    num_workers: int = doc("Ray Train workers (gloo on CPU, NCCL on GPU); 1 runs in-process", default=1)
    strategy: Literal["ddp", "fsdp"] = doc(
        "how workers share the policy: ddp (a full copy each, gradients all-reduced during backward) or fsdp "
        "(FSDP2: parameters, gradients and optimizer state sharded per decoder layer)", default="ddp")
    max_failures: int = doc("Ray Train restarts of the worker group after a worker dies; each restart resumes from "
                            "the latest checkpoint (use with --save-every)", default=0)
    lora_r: int = doc("LoRA rank (0: train all weights); only the adapters get gradients and optimizer state",
                      default=0)
    lora_alpha: float = doc("LoRA scaling alpha (the update is alpha / r * B A)", default=16.0)
    lora_dropout: float = doc("dropout on the LoRA branch", default=0.0)
    lora_target_modules: str = doc("comma list of module names that get adapters, or all-linear (every linear "
                                   "layer but the LM head)", default="all-linear")
    seed: int = doc("seed for shard order, shuffle buffer and torch", group="training", default=0)
    gradient_checkpointing: bool = doc("recompute activations in backward: less memory for more time per step "
                                       "(on, as in TRL; false for the fastest steps)", default=True)
    shuffle_buffer: int = doc("pairs held for shuffling within the stream", default=256)
    overwrite: bool = doc("start over in an OUTPUT that already has a run (its old files are removed)",
                          default=False)

    def check(self) -> None:
        super().check()
        _positive(self, "learning_rate", "batch_size", "max_steps", "epochs", "keep_checkpoints", "num_workers",
                  "shuffle_buffer", "stop_at_step")
        if not 0 <= self.warmup_ratio <= 1:
            raise ConfigError(f"config key 'warmup_ratio': must be in [0, 1], got {self.warmup_ratio}")
        for name in ("save_every", "eval_every", "early_stopping_patience"):
            if getattr(self, name) < 0:
                raise ConfigError(f"config key '{name}': must be 0 (off) or positive, got {getattr(self, name)}")
        if self.max_failures < 0 or self.lora_r < 0:
            raise ConfigError("config keys 'max_failures', 'lora_r': must be 0 or positive "
                              f"(got {self.max_failures}, {self.lora_r})")
        if not 0 <= self.lora_dropout < 1 or self.lora_alpha <= 0:
            raise ConfigError(f"config keys 'lora_dropout', 'lora_alpha': need 0 <= dropout < 1 and alpha > 0 "
                              f"(got {self.lora_dropout}, {self.lora_alpha})")
        if self.early_stopping_patience and not self.eval_refs:
            raise ConfigError("config key 'early_stopping_patience': needs eval_refs (a held-out set to watch)")


@dataclass(frozen=True)
class EvalConfig(PolicyPass):
    refs: str = doc("precompute output of a held-out set", default="runs/demo-heldout")
    model: str | None = doc("policy to score: a final/, best/, final/adapter/ (LoRA) or checkpoints/step-N folder "
                            "(default: the reference itself)", default=None)
    output: str | None = doc("where eval.json and samples go (default: MODEL/eval, or runs/eval)", default=None)
    loss_type: str | None = doc("loss reported as eval/loss (default: the run's, from the train_config.yaml "
                                "beside MODEL, else sigmoid): " + ", ".join(LOSS_NAMES), default=None)
    beta: float | None = doc("beta of the implicit reward (default: the run's, else 0.1)", default=None)
    micro_batch_size: int = doc("pairs per forward", default=4)
    samples: int = doc("side-by-side generations from reference and policy for N held-out prompts", default=0)
    max_new_tokens: int = doc("generation length for samples", default=128)
    temperature: float = doc("sampling temperature for samples (0: greedy)", default=0.7)
    top_p: float = doc("nucleus sampling for samples", default=0.9)
    seed: int = doc("seed for sampling (the same for both models)", default=0)

    def check(self) -> None:
        super().check()
        _positive(self, "max_new_tokens")
        if self.samples < 0 or self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ConfigError("config keys 'samples', 'temperature', 'top_p': need samples >= 0, temperature >= 0, "
                              f"0 < top_p <= 1 (got {self.samples}, {self.temperature}, {self.top_p})")


@dataclass(frozen=True)
class SweepConfig(TrainConfig):
    """Every training key, with `beta` a list: one training run per beta."""

    beta: str = doc("comma list of betas, one short training run each", default="0.01,0.05,0.1,0.5")
    eval_refs: str = doc("precompute output of a held-out set", default="runs/demo-heldout")
    output: str = doc("sweep folder: one run per beta (OUTPUT/beta-B), sweep.png, sweep.md, sweep.json",
                      default="runs/sweep")
    overwrite: bool = doc("start each beta's run over when its folder holds one", default=True)

    @property
    def betas(self) -> list[float]:
        try:
            values = [float(b) for b in self.beta.split(",") if b.strip()]
        except ValueError:
            raise ConfigError(f"config key 'beta': {self.beta!r} is not a comma list of numbers") from None
        if not values or any(b <= 0 for b in values):
            raise ConfigError(f"config key 'beta': need positive betas, got {self.beta!r}")
        return values

    def check(self) -> None:
        super().check()
        self.betas  # noqa: B018  raises on a bad list

    def run_config(self, beta: float) -> TrainConfig:
        """The training run of one beta: every other key as given."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(TrainConfig)}
        return TrainConfig(**{**values, "beta": beta, "output": f"{self.output.rstrip('/')}/beta-{beta:g}"})


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
    eval_refs: str | None = doc("precompute output of a held-out set: evaluated after training", default=None)
    num_workers: int = doc("scorer actors and training workers", default=1)
    dtype: Dtype = doc("reference and compute dtype", default="float32")
    precompute_options: str | None = doc("precompute keys for this chain, as JSON or a YAML mapping (not data, "
                                         "model, output)", default=None)
    train_options: str | None = doc("train keys for this chain, as JSON or a YAML mapping (not refs, output, "
                                    "resume)", default=None)
    eval_options: str | None = doc("eval keys for this chain, as JSON or a YAML mapping (not refs, model, output)",
                                   default=None)

    def check(self) -> None:
        super().check()
        _positive(self, "num_workers")
        if self.date is not None and not re.fullmatch(r"\d{4}-\d{2}-\d{2}", self.date):
            raise ConfigError(f"config key 'date': expected YYYY-MM-DD, got {self.date!r}")
        try:
            name = self.run_name.format(date="2000-01-01")
        except (KeyError, IndexError, ValueError) as e:
            raise ConfigError(f"config key 'run_name': {self.run_name!r} may use only {{date}} ({e})") from None
        if not name or "/" in name or name in (".", ".."):
            raise ConfigError(f"config key 'run_name': {self.run_name!r} must name one folder")
        for key in ("precompute_options", "train_options", "eval_options"):
            parse_options(key, getattr(self, key))


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
        _positive(self, "num_samples", "max_new_tokens")
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
        _positive(self, "batch_size", "num_workers", "rows_per_file")
        _check_limit(self.limit, "prompts")


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
    max_length: int = doc("most tokens of prompt + response a reward model reads (longer: cut at the start's "
                          "end, keep_start)", group="judge", default=2048)
    dtype: Dtype = doc("dtype of the reward model / policy", default="float32")
    overwrite: bool = doc("replace an output judged with other settings", default=False)

    def check(self) -> None:
        super().check()
        _positive(self, "batch_size", "num_workers", "max_length")
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
    generate_options: str | None = doc("generate keys, JSON or a YAML mapping (not prompts, model, output)",
                                       default=None)
    judge_options: str | None = doc("judge keys, JSON or a YAML mapping (not candidates, output)", default=None)
    precompute_options: str | None = doc("precompute keys, JSON or a YAML mapping (not data, model, output)",
                                         default=None)
    train_options: str | None = doc("train keys, JSON or a YAML mapping (not refs, model, output, resume)",
                                    default=None)
    eval_options: str | None = doc("eval keys, JSON or a YAML mapping (not refs, model, output)", default=None)

    def check(self) -> None:
        super().check()
        self.check_sampling()
        _positive(self, "rounds", "num_workers")
        if self.new_rounds < 0:
            raise ConfigError(f"config key 'new_rounds': must be 0 (all) or positive, got {self.new_rounds}")
        if self.reward_model and self.reward_fn:
            raise ConfigError("iterate: give one judge, --reward-model or --reward-fn, not both")
        for key in ("generate_options", "judge_options", "precompute_options", "train_options", "eval_options"):
            parse_options(key, getattr(self, key))


def parse_options(key: str, text: str | None) -> dict:
    """A JSON object of config keys (a YAML mapping in --config arrives as JSON), {} when unset."""
    if not text:
        return {}
    try:
        options = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"config key '{key}': not valid JSON ({e.msg})") from None
    if not isinstance(options, dict):
        raise ConfigError(f"config key '{key}': expected a mapping of config keys")
    return options


STAGE_CONFIGS = {"precompute": PrecomputeConfig, "train": TrainConfig, "eval": EvalConfig, "sweep": SweepConfig,
                 "run": RunConfig, "generate": GenerateConfig, "judge": JudgeConfig, "iterate": IterateConfig}


# ---------------------------------------------------------------------------------------------
# Parsing, generic over any stage's dataclass.


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """`int | None` -> (int, True)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _coerce_number(name: str, base: type, value: Any) -> Any:
    kind = "an integer" if base is int else "a number"
    if isinstance(value, bool):
        raise ConfigError(f"config key '{name}': expected {kind}, got {value!r}")
    try:
        if base is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        number = base(value)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"config key '{name}': expected {kind}, got {value!r}") from None
    if not math.isfinite(number):  # nan compares false with every bound, and would pass the range checks
        raise ConfigError(f"config key '{name}': expected a finite number, got {value!r}")
    return number


def coerce(name: str, tp: Any, value: Any) -> Any:
    """Convert a YAML or CLI value to the field's type, or raise ConfigError naming the key."""
    base, optional = _unwrap_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null", "")):
        if optional:
            return None
        raise ConfigError(f"config key '{name}': a value is required, got none")
    if typing.get_origin(base) is Literal:
        choices = typing.get_args(base)
        if isinstance(value, bool) and "true" in choices:  # YAML `resume: true`
            value = "true" if value else "false"
        if value not in choices:
            raise ConfigError(f"config key '{name}': {value!r} is not one of {', '.join(map(str, choices))}")
        return value
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"config key '{name}': expected true or false, got {value!r}")
    if base in (int, float):
        return _coerce_number(name, base, value)
    if isinstance(value, dict) and name.endswith("_options"):  # a YAML mapping for a JSON-valued key
        return json.dumps(value)
    if isinstance(value, (dict, list)):
        raise ConfigError(f"config key '{name}': expected a string, got {type(value).__name__}")
    return str(value)


def from_mapping(cls: type, values: dict[str, Any], base: Any = None, source: str = "config") -> Any:
    """Build `cls` from a mapping over `base` (or the defaults); unknown keys are errors."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = [k for k in values if k.replace("-", "_") not in names]
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {', '.join(map(repr, unknown))}; "
                          f"known keys: {', '.join(sorted(names))}")
    kwargs = dataclasses.asdict(base) if base is not None else {}
    for key, value in values.items():
        name = key.replace("-", "_")
        kwargs[name] = coerce(name, hints[name], value)
    return cls(**kwargs)


def ordered_fields(cls: type) -> list[dataclasses.Field]:
    """Fields for help and docs, the class's own first (`refs` before the shared `storage_options`)."""
    by_name = {f.name: f for f in dataclasses.fields(cls)}
    order: list[str] = []
    for klass in cls.__mro__:
        order += [n for n in getattr(klass, "__annotations__", {}) if n in by_name and n not in order]
    return [by_name[n] for n in order]


# --help groups, in the order they are shown; `FIELD_GROUPS` puts every field in one (a test holds every
# stage's fields to it, so a new key cannot land in "other" unnoticed; the CLI still works if one does).
GROUPS = ("input", "lengths and truncation", "model", "output", "training", "loss", "checkpoints", "evaluation",
          "sampling", "judge", "rounds", "stage options", "workers and devices", "storage", "progress", "other")
_GROUP_FIELDS = {
    "input": ("data", "refs", "candidates", "prompts", "format", "split", "limit", "prompt_column", "chosen_column",
              "rejected_column", "completion_column", "label_column", "unpair", "kl_seed"),
    "lengths and truncation": ("max_length", "max_prompt_length", "truncation_mode"),
    "model": ("model", "dtype", "pack_prompts", "gradient_checkpointing", "lora_r", "lora_alpha", "lora_dropout",
              "lora_target_modules"),
    "output": ("output", "overwrite", "append", "rows_per_shard", "rows_per_file", "runs", "run_name", "date"),
    "training": ("learning_rate", "weight_decay", "lr_scheduler", "warmup_ratio", "max_steps", "epochs",
                 "max_grad_norm", "shuffle_buffer"),
    "loss": ("loss_type", "loss_weights", "beta", "label_smoothing", "discopop_tau", "simpo_gamma",
             "desirable_weight", "undesirable_weight"),
    "checkpoints": ("save_every", "keep_checkpoints", "stop_at_step", "resume"),
    "evaluation": ("eval_refs", "eval_every", "early_stopping_patience", "early_stopping_metric", "score_final"),
    "sampling": ("num_samples", "temperature", "top_p", "max_new_tokens", "seed", "engine", "samples"),
    "judge": ("reward_model", "reward_fn", "labels", "implicit", "export_sheet", "pairs", "min_margin",
              "missing_eos_penalty"),
    "rounds": ("rounds", "new_rounds", "reference"),
    "stage options": ("precompute_options", "train_options", "eval_options", "generate_options", "judge_options"),
    "workers and devices": ("device", "gpu_wait_seconds", "num_workers", "gpus_per_worker", "strategy",
                            "max_failures", "batch_size", "micro_batch_size"),
    "storage": ("storage_options",),
    "progress": ("progress",),
}
FIELD_GROUPS = {name: group for group, names in _GROUP_FIELDS.items() for name in names}


def field_group(f: dataclasses.Field) -> str:
    """The --help group of a field: its own `doc(group=...)`, else its name's."""
    return f.metadata.get("group") or FIELD_GROUPS.get(f.name, "other")


def _choices(tp: Any) -> tuple | None:
    base, _ = _unwrap_optional(tp)
    return typing.get_args(base) if typing.get_origin(base) is Literal else None


def show_default(default: Any) -> str:
    """A default as it is typed on the command line: true/false, none, a plain string."""
    if isinstance(default, bool):
        return str(default).lower()
    return "none" if default is None else str(default)


def with_default(help_text: str, default: Any) -> str:
    """The help with its default said once: a text that already says "(default: ...)" in words keeps its own."""
    return help_text if "(default:" in help_text else f"{help_text} (default: {show_default(default)})"


def field_help(cls: type) -> list[tuple[str, str, Any]]:
    """(flag, help, default) per field: the CLI help, and the option tables in docs/options.md."""
    return [("--" + f.name.replace("_", "-"), f.metadata.get("help", ""), f.default) for f in ordered_fields(cls)]


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line, `error: PROG: ...` on stderr and exit 2 (argparse's own
    contract, without the whole usage), naming the flag a misspelt one resembles. No abbreviations:
    flags are config keys, and a prefix (`--lr`) would bind to whichever key starts with it."""

    def __init__(self, *args: Any, unrecognized_hint: str = "", **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        self.unrecognized_hint = unrecognized_hint  # what to add when a word is no flag of this command

    def error(self, message: str) -> typing.NoReturn:
        if "unrecognized arguments:" in message:
            message += self._did_you_mean(message) + (f" ({self.unrecognized_hint})" if self.unrecognized_hint else "")
        self.exit(2, f"error: {self.prog}: {message}; see `{self.prog} --help`\n")

    def _did_you_mean(self, message: str) -> str:
        known = {s[2:]: s for s in self._option_string_actions if s.startswith("--")}
        words = [w.split("=", 1)[0] for w in message.split("unrecognized arguments:", 1)[1].split()]
        guesses: list[str] = []
        for word in (w.lstrip("-").replace("_", "-") for w in words if w.startswith("-")):  # --learning_rate
            close = [word] if word in known else difflib.get_close_matches(word, known, n=1, cutoff=0.75)
            guesses += [known[g] for g in close if known[g] not in guesses]
        return f" (did you mean {' or '.join(guesses)}?)" if guesses else ""


def _add_field(group: Any, f: dataclasses.Field, tp: Any) -> None:
    """One field's flag: choices and true|false shown as values, the default once."""
    flag = "--" + f.name.replace("_", "-")
    base, _ = _unwrap_optional(tp)
    choices = _choices(tp)
    # Values stay strings here (dest defaults None: "not given"); `coerce` converts them with the field's
    # type, so a YAML key and its flag are checked alike. A flag alone means true (`--overwrite`).
    kwargs: dict[str, Any] = {"dest": f.name, "default": None,
                              "help": with_default(f.metadata.get("help", ""), f.default).replace("%", "%%")}
    if choices:
        kwargs["metavar"] = "{" + ",".join(map(str, choices)) + "}"
    if base is bool:
        kwargs["metavar"] = "true|false"
    if base is bool or (choices and "true" in choices):
        kwargs.update(nargs="?", const="true")
    group.add_argument(flag, **kwargs)


def build_parser(cls: type, prog: str, description: str) -> argparse.ArgumentParser:
    """One flag per field, in argument groups (`GROUPS`); values stay strings here and are coerced with the
    field's type."""
    parser = Parser(prog=prog, description=description, usage="%(prog)s [--config FILE.yaml] [--FLAG VALUE ...]")
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file of config keys (CLI flags win over it) "
                                                              "(default: none)")
    hints = typing.get_type_hints(cls)
    fields = ordered_fields(cls)
    for title in GROUPS:
        members = [f for f in fields if field_group(f) == title]
        if members:
            group = parser.add_argument_group(title)
            for f in members:
                _add_field(group, f, hints[f.name])
    return parser


def parse_args(cls: type, argv: list[str], prog: str, description: str = "") -> Any:
    """defaults < YAML file < CLI flags."""
    args = build_parser(cls, prog, description).parse_args(argv)
    cfg = cls()
    if args.config:
        try:
            if "://" in args.config:  # a config beside the data (s3://...): fsspec, with the flags' storage options
                import fsspec

                with fsspec.open(args.config, "rt", **parse_storage_options(args.storage_options)) as fh:
                    loaded = yaml.safe_load(fh) or {}
            else:
                with open(args.config) as fh:
                    loaded = yaml.safe_load(fh) or {}
        except (OSError, ValueError, yaml.YAMLError) as e:
            raise ConfigError(f"{args.config}: cannot read the config file ({e})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{args.config}: expected a mapping of config keys, got {type(loaded).__name__}")
        cfg = from_mapping(cls, loaded, source=args.config)
    flags = {k: v for k, v in vars(args).items() if k != "config" and v is not None}
    return from_mapping(cls, flags, base=cfg, source="command line")


def public(cfg: Any) -> dict:
    """The config as a dict fit to write, its own keys first: storage options with their secrets redacted."""
    out = {f.name: getattr(cfg, f.name) for f in ordered_fields(type(cfg))}
    if out.get("storage_options"):
        try:
            out["storage_options"] = json.dumps(redact(json.loads(out["storage_options"])))
        except json.JSONDecodeError:
            out["storage_options"] = "<redacted>"
    return out


def to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(public(cfg), sort_keys=False)


def options_markdown() -> str:
    """docs/options.md: one table per command, made from the dataclasses' help (a test keeps it current)."""
    parts = ["# Options\n", "Every key can be set in a YAML file (`--config FILE.yaml`) and overridden by its flag;",
             "precedence is defaults < YAML < flags. Made by `python -m stages.core.config > docs/options.md`",
             "from the config classes in `stages/core/config.py`; a test fails when this file and the code differ.\n"]
    for command, cls in STAGE_CONFIGS.items():
        parts += [f"## `pipeline.py {command}`\n", "| group | flag / YAML key | default | meaning |",
                  "|---|---|---|---|"]
        parts += _option_rows(cls)
        parts.append("")
    return "\n".join(parts)


def _option_rows(cls: type) -> list[str]:
    """One table row per field, grouped as --help groups them; a Literal's values after its flag."""
    hints = typing.get_type_hints(cls)
    rows = []
    for title in GROUPS:
        for f in (f for f in ordered_fields(cls) if field_group(f) == title):
            flag, key, choices = "--" + f.name.replace("_", "-"), f.name, _choices(hints[f.name])
            shown = f"`{flag}` `{{{','.join(map(str, choices))}}}`" if choices else f"`{flag}`"
            help_text = f.metadata.get("help", "").replace("|", "/")
            rows.append(f"| {title} | {shown} / `{key}` | `{show_default(f.default)}` | {help_text} |")
    return rows


if __name__ == "__main__":
    print(options_markdown(), end="")
