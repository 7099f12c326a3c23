"""Typed stage configs: frozen dataclasses, a YAML file, CLI flags that win over it.

Precedence is defaults < YAML (`--config FILE.yaml`) < CLI flags. Every field becomes a flag
(`max_length` -> `--max-length`) whose help is the field's one-line doc. Unknown keys and values
of the wrong type are errors that name the key, raised in the driver before any Ray worker starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A bad config key or value; the message names the key."""


def doc(help_text: str, **kwargs: Any) -> Any:
    """A dataclass field with its one-line help."""
    return field(metadata={"help": help_text}, **kwargs)


@dataclass(frozen=True)
class PrecomputeConfig:
    data: str = doc("input: file, directory, save_to_disk dir, fsspec URL, or hub name", default="embedded:hh-rlhf-helpful")
    model: str = doc("reference model: local dir, hub name, or 'embedded:smollm2-135m-instruct'",
                     default="embedded:smollm2-135m-instruct")
    output: str = doc("output directory or fsspec URL for shards, rejects and manifest.json", default="runs/demo")
    format: Literal["auto", "standard", "hh", "ultrafeedback", "helpsteer3", "openai", "sharegpt"] = doc(
        "input layout; auto detects openai/sharegpt/helpsteer3 and otherwise reads TRL's standard or "
        "conversational rows as-is (hh text is only parsed into turns with --format hh)", default="auto")
    prompt_column: str = doc("column holding the prompt (optional: implicit prompts are extracted)", default="prompt")
    chosen_column: str = doc("column holding the chosen answer", default="chosen")
    rejected_column: str = doc("column holding the rejected answer", default="rejected")
    split: str = doc("split to read from a DatasetDict / hub dataset", default="train")
    max_length: int | None = doc("max tokens of prompt+completion, TRL's max_length (None: no limit)", default=1024)
    max_prompt_length: int | None = doc("max prompt tokens before max_length applies (None: no limit)", default=None)
    truncation_mode: Literal["keep_start", "keep_end"] = doc("which end of a too-long sequence to keep", default="keep_start")
    batch_size: int = doc("pairs per scorer call (bucketed by length into forwards inside the call)", default=64)
    num_workers: int = doc("scorer actors (one GPU each where CUDA exists)", default=1)
    dtype: Literal["float32", "bfloat16"] = doc("reference model dtype", default="float32")
    pack_prompts: bool = doc("score each prompt once for both answers (packed rows, 4D mask)", default=True)
    rows_per_shard: int = doc("input rows per output shard (shard k holds input rows [k*n, (k+1)*n))", default=1000)
    limit: int | None = doc("read only the first N input rows", default=None)
    overwrite: bool = doc("replace an existing output made with other settings", default=False)
    seed: int = doc("seed (used by nothing random in scoring; recorded for provenance)", default=0)
    storage_options: str | None = doc("JSON of fsspec options (endpoint, profile, ...); secrets are never written",
                                      default=None)
    progress: bool = doc("show a progress bar", default=True)


@dataclass(frozen=True)
class TrainConfig:
    refs: str = doc("precompute output (shards + manifest.json), local or fsspec URL", default="runs/demo")
    model: str | None = doc("policy initialisation (default: the manifest's reference model)", default=None)
    output: str | None = doc("run folder: metrics, checkpoints, final/ (default: REFS/policy)", default=None)
    loss_type: str = doc("loss or comma list: sigmoid, robust, ipo, hinge, exo_pair, nca_pair, bco_pair, sppo_hard, "
                         "aot, aot_unpaired, apo_zero, apo_down, discopop, sigmoid_norm, simpo, orpo, sft",
                         default="sigmoid")
    loss_weights: str | None = doc("comma list of weights, one per loss (default: all 1)", default=None)
    beta: float = doc("KL strength beta (IPO tau, ORPO lambda)", default=0.1)
    label_smoothing: float = doc("assumed label-flip rate for robust / exo_pair / aot / simpo", default=0.0)
    discopop_tau: float = doc("DiscoPOP temperature", default=0.05)
    simpo_gamma: float = doc("SimPO target margin gamma", default=0.5)
    learning_rate: float = doc("peak AdamW learning rate", default=5e-6)
    weight_decay: float = doc("AdamW weight decay", default=0.0)
    lr_scheduler: Literal["linear", "cosine", "constant"] = doc("decay after warmup", default="linear")
    warmup_ratio: float = doc("fraction of steps spent warming up", default=0.1)
    batch_size: int = doc("pairs per optimizer step (global, over all workers)", default=8)
    micro_batch_size: int = doc("pairs per forward/backward on one worker", default=2)
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
    num_workers: int = doc("Ray Train workers (DDP: gloo on CPU, NCCL on GPU); 1 runs in-process", default=1)
    seed: int = doc("seed for shard order, shuffle buffer and torch", default=0)
    dtype: Literal["float32", "bfloat16"] = doc("compute dtype (bfloat16: autocast over float32 weights)",
                                                default="float32")
    gradient_checkpointing: bool = doc("recompute activations in backward: much less memory for a few per cent more "
                                       "time (on, as in TRL; false for the fastest steps)", default=True)
    pack_prompts: bool = doc("run each prompt once for both answers (packed rows, 4D mask): fewer tokens, "
                             "less activation memory, same values", default=True)
    shuffle_buffer: int = doc("pairs held for shuffling within the stream", default=256)
    overwrite: bool = doc("start over in an OUTPUT that already has a run", default=False)
    storage_options: str | None = doc("JSON of fsspec options (endpoint, profile, ...); secrets are never written",
                                      default=None)
    progress: bool = doc("show a progress bar", default=True)


@dataclass(frozen=True)
class EvalConfig:
    refs: str = doc("precompute output of a held-out set", default="runs/demo-heldout")
    model: str | None = doc("policy to score: a final/, best/ or checkpoints/step-N folder "
                            "(default: the reference itself)", default=None)
    output: str | None = doc("where eval.json and samples go (default: MODEL/eval, or runs/eval)", default=None)
    beta: float = doc("beta of the implicit reward beta * log(pi/pi_ref)", default=0.1)
    loss_type: str = doc("loss reported as eval/loss", default="sigmoid")
    micro_batch_size: int = doc("pairs per forward", default=4)
    dtype: Literal["float32", "bfloat16"] = doc("compute dtype", default="float32")
    samples: int = doc("side-by-side generations from reference and policy for N held-out prompts", default=0)
    max_new_tokens: int = doc("generation length for samples", default=128)
    temperature: float = doc("sampling temperature for samples (0: greedy)", default=0.7)
    top_p: float = doc("nucleus sampling for samples", default=0.9)
    seed: int = doc("seed for sampling (the same for both models)", default=0)
    storage_options: str | None = doc("JSON of fsspec options; secrets are never written", default=None)
    progress: bool = doc("show a progress bar", default=True)


@dataclass(frozen=True)
class SweepConfig:
    refs: str = doc("precompute output to train on (scored once, shared by every run)", default="runs/demo")
    eval_refs: str = doc("precompute output of a held-out set", default="runs/demo-heldout")
    beta: str = doc("comma list of betas, one short training run each", default="0.01,0.05,0.1,0.5")
    output: str = doc("sweep folder: one run per beta, sweep.png, sweep.md, sweep.json", default="runs/sweep")
    model: str | None = doc("policy initialisation (default: the manifest's reference model)", default=None)
    loss_type: str = doc("loss (see train)", default="sigmoid")
    learning_rate: float = doc("peak AdamW learning rate", default=5e-6)
    batch_size: int = doc("pairs per optimizer step", default=8)
    micro_batch_size: int = doc("pairs per forward", default=2)
    max_steps: int | None = doc("steps per run (default: one epoch)", default=None)
    epochs: int = doc("epochs per run when max_steps is unset", default=1)
    seed: int = doc("seed, the same for every run", default=0)
    dtype: Literal["float32", "bfloat16"] = doc("compute dtype", default="float32")
    storage_options: str | None = doc("JSON of fsspec options; secrets are never written", default=None)
    progress: bool = doc("show progress bars", default=True)


# ---------------------------------------------------------------------------------------------
# Parsing and validation, generic over any stage's dataclass.


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """`int | None` -> (int, True)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


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
    if base is int:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{name}': expected an integer, got {value!r}")
        try:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"config key '{name}': expected an integer, got {value!r}") from None
    if base is float:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{name}': expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"config key '{name}': expected a number, got {value!r}") from None
    if base is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"config key '{name}': expected a string, got {type(value).__name__}")
        return str(value)
    return value


def _types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=False)


def from_mapping(cls: type, values: dict[str, Any], base: Any = None, source: str = "config") -> Any:
    """Build `cls` from a mapping over `base` (or the defaults); unknown keys are errors."""
    hints = _types(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = [k for k in values if k.replace("-", "_") not in names]
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {', '.join(map(repr, unknown))}; known keys: {', '.join(sorted(names))}")
    kwargs = dataclasses.asdict(base) if base is not None else {}
    for key, value in values.items():
        name = key.replace("-", "_")
        kwargs[name] = coerce(name, hints[name], value)
    cfg = cls(**kwargs)
    validate(cfg)
    return cfg


def validate(cfg: Any) -> None:
    """Range checks shared by the stages, naming the key."""
    for name in ("batch_size", "num_workers", "rows_per_shard", "max_length", "max_prompt_length", "limit",
                 "micro_batch_size", "max_steps", "epochs", "shuffle_buffer", "keep_checkpoints"):
        value = getattr(cfg, name, None)
        if value is not None and value <= 0 and not (name == "limit" and value == 0):
            raise ConfigError(f"config key '{name}': must be positive, got {value}")
    for name in ("beta", "learning_rate"):
        value = getattr(cfg, name, None)
        if isinstance(value, (int, float)) and value <= 0:  # the sweep's beta is a list, checked there
            raise ConfigError(f"config key '{name}': must be positive, got {value}")
    eps = getattr(cfg, "label_smoothing", None)
    if eps is not None and not 0 <= eps < 0.5:
        raise ConfigError(f"config key 'label_smoothing': must be in [0, 0.5), got {eps}")
    if getattr(cfg, "warmup_ratio", 0) is not None and not 0 <= getattr(cfg, "warmup_ratio", 0) <= 1:
        raise ConfigError(f"config key 'warmup_ratio': must be in [0, 1], got {cfg.warmup_ratio}")
    if getattr(cfg, "early_stopping_patience", 0) and not getattr(cfg, "eval_refs", None):
        raise ConfigError("config key 'early_stopping_patience': needs eval_refs (a held-out set to watch)")
    if getattr(cfg, "early_stopping_patience", 0) < 0:
        raise ConfigError("config key 'early_stopping_patience': must be 0 (off) or positive")
    if hasattr(cfg, "loss_type"):
        from stages.losses import parse_loss_types

        try:
            parse_loss_types(cfg.loss_type, getattr(cfg, "loss_weights", None))
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if getattr(cfg, "storage_options", None):
        from stages.storage import configure

        try:
            configure(cfg.storage_options)  # validates the JSON; each stage configures again when it runs
        except ValueError as e:
            raise ConfigError(str(e)) from None
    ml, mpl = getattr(cfg, "max_length", None), getattr(cfg, "max_prompt_length", None)
    if ml is not None and mpl is not None and mpl >= ml:
        raise ConfigError(f"config key 'max_prompt_length': {mpl} leaves no room under max_length {ml}")


def build_parser(cls: type, prog: str, description: str) -> argparse.ArgumentParser:
    """One flag per field; values stay strings here and are coerced with the field's type."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", help="YAML file of config keys (CLI flags win over it)")
    hints = _types(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata.get('help', '')} (default: {f.default!r})"
        base, _ = _unwrap_optional(hints[f.name])
        if base is bool or (typing.get_origin(base) is Literal and "true" in typing.get_args(base)):
            parser.add_argument(flag, dest=f.name, nargs="?", const="true", default=None, help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, default=None, help=help_text)
    return parser


def parse_args(cls: type, argv: list[str], prog: str, description: str = "") -> Any:
    """defaults < YAML file < CLI flags."""
    args = build_parser(cls, prog, description).parse_args(argv)
    cfg = cls()
    if args.config:
        with open(args.config) as fh:
            loaded = yaml.safe_load(fh) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{args.config}: expected a mapping of config keys, got {type(loaded).__name__}")
        cfg = from_mapping(cls, loaded, source=args.config)
    flags = {k: v for k, v in vars(args).items() if k != "config" and v is not None}
    return from_mapping(cls, flags, base=cfg, source="command line")


def public(cfg: Any) -> dict:
    """The config as a dict fit to write: storage options with their secrets redacted."""
    from stages.storage import redact_json

    out = dataclasses.asdict(cfg)
    if out.get("storage_options"):
        out["storage_options"] = redact_json(out["storage_options"])
    return out


def to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(public(cfg), sort_keys=False)
