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
    batch_size: int = doc("pairs per scorer call", default=16)
    num_workers: int = doc("scorer actors (one GPU each where CUDA exists)", default=1)
    dtype: Literal["float32", "bfloat16"] = doc("reference model dtype", default="float32")
    rows_per_shard: int = doc("input rows per output shard (shard k holds input rows [k*n, (k+1)*n))", default=1000)
    limit: int | None = doc("read only the first N input rows", default=None)
    overwrite: bool = doc("replace an existing output made with other settings", default=False)
    seed: int = doc("seed (used by nothing random in scoring; recorded for provenance)", default=0)
    progress: bool = doc("show a progress bar", default=True)


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
    for name in ("batch_size", "num_workers", "rows_per_shard", "max_length", "max_prompt_length", "limit"):
        value = getattr(cfg, name, None)
        if value is not None and value <= 0 and not (name == "limit" and value == 0):
            raise ConfigError(f"config key '{name}': must be positive, got {value}")
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
        if base is bool:
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


def to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)
