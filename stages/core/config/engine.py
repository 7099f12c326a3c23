"""The config engine, generic over any frozen dataclass of options: coerce a YAML or CLI value to its
field's annotation, build a config from a mapping, argparse with grouped help and a did-you-mean error,
defaults < YAML (`--config FILE.yaml`) < flags, the config written back as YAML, option tables in
Markdown.

It knows no command: the option classes (`options.py`, ...) use it, never the other way round. A class
names its --help groups in a `HELP_GROUPS` class variable (title -> field names); a field's own
`doc(group=...)` wins. The one field name it knows is `storage_options`: the fsspec options a
`--config s3://...` is read with, and what `public` redacts.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import types
import typing
from dataclasses import field
from typing import Any, Literal

import yaml

from stages.core.errors import PipelineError


class ConfigError(PipelineError, ValueError):
    """A bad config key or value; the message names the key."""


def doc(help_text: str, group: str | None = None, **kwargs: Any) -> Any:
    """A dataclass field with its one-line help; `group` where its --help group is not its name's
    (the class's `HELP_GROUPS`): a key that means something else in one command (judge's --seed)."""
    return field(metadata={"help": help_text, **({"group": group} if group else {})}, **kwargs)


_SECRET_WORDS = ("key", "secret", "token", "password", "credential", "session")


def redact(value: Any) -> Any:
    """A copy with every value under a secret-looking key replaced, for logs and written configs."""
    if isinstance(value, dict):
        return {k: "<redacted>" if any(w in str(k).lower() for w in _SECRET_WORDS) else redact(v)
                for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value


def parse_options(key: str, text: str | dict | None) -> dict:
    """A mapping of keys: a dict as is, a JSON object (how a flag gives one) parsed; {} when unset."""
    if not text:
        return {}
    options = text
    if isinstance(text, str):
        try:
            options = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"config key '{key}': not valid JSON ({e.msg})") from None
    if not isinstance(options, dict):
        raise ConfigError(f"config key '{key}': expected a mapping of config keys")
    return options


# ---------------------------------------------------------------------------------------------
# Coercion by annotation.


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


def _coerce_list(name: str, base: Any, value: Any) -> list:
    """`list[float]`: a YAML list, or the comma list a flag gives (`0.01,0.05`)."""
    (item,) = typing.get_args(base) or (str,)
    if isinstance(value, dict):
        raise ConfigError(f"config key '{name}': expected a list, got a mapping")
    items = value if isinstance(value, (list, tuple)) else [v for v in str(value).split(",") if v.strip()]
    return [_coerce_number(name, item, v) if item in (int, float) else str(v) for v in items]


def coerce(name: str, tp: Any, value: Any) -> Any:
    """Convert a YAML or CLI value to the field's type, or raise ConfigError naming the key."""
    base, optional = _unwrap_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null", "")):
        if optional:
            return None
        raise ConfigError(f"config key '{name}': a value is required, got none")
    origin = typing.get_origin(base) or base
    if origin is Literal:
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
    if origin is dict:  # a YAML mapping, or JSON on the command line
        if not isinstance(value, (str, dict)):
            raise ConfigError(f"config key '{name}': expected a mapping, got {type(value).__name__}")
        return parse_options(name, value)
    if origin is list:
        return _coerce_list(name, base, value)
    if isinstance(value, (dict, list)):
        raise ConfigError(f"config key '{name}': expected a string, got {type(value).__name__}")
    return str(value)


def from_mapping(cls: type, values: dict[str, Any], base: Any = None, source: str = "config") -> Any:
    """Build `cls` from a mapping over `base` (or the defaults); unknown keys are errors."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = [k for k in values if k.replace("-", "_") not in names]
    renamed = getattr(cls, "RENAMED", {})
    moved = [k for k in unknown if k.replace("-", "_") in renamed]
    if moved:
        raise ConfigError(f"{source}: key {moved[0]!r} is now {renamed[moved[0].replace('-', '_')]!r}")
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {', '.join(map(repr, unknown))}; "
                          f"known keys: {', '.join(sorted(names))}")
    kwargs = {f.name: getattr(base, f.name) for f in dataclasses.fields(cls)} if base is not None else {}
    for key, value in values.items():
        name = key.replace("-", "_")
        kwargs[name] = coerce(name, hints[name], value)
    return cls(**kwargs)


# ---------------------------------------------------------------------------------------------
# Help: fields in order and in groups, defaults as typed.


def ordered_fields(cls: type) -> list[dataclasses.Field]:
    """Fields for help and docs, the class's own first (`refs` before the shared `storage_options`)."""
    by_name = {f.name: f for f in dataclasses.fields(cls)}
    order: list[str] = []
    for klass in cls.__mro__:
        order += [n for n in getattr(klass, "__annotations__", {}) if n in by_name and n not in order]
    return [by_name[n] for n in order]


def help_groups(cls: type) -> list[str]:
    """The --help groups of a class, in the order they are shown; "other" last, for a field in none."""
    return [*getattr(cls, "HELP_GROUPS", {}), "other"]


def field_group(cls: type, f: dataclasses.Field) -> str:
    """The --help group of a field: its own `doc(group=...)`, else the class's group holding its name."""
    groups = getattr(cls, "HELP_GROUPS", {})
    return f.metadata.get("group") or next((t for t, names in groups.items() if f.name in names), "other")


def default_of(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def _choices(tp: Any) -> tuple | None:
    base, _ = _unwrap_optional(tp)
    return typing.get_args(base) if typing.get_origin(base) is Literal else None


def show_default(default: Any) -> str:
    """A default as it is typed on the command line: true/false, none, a comma list, a plain string."""
    if isinstance(default, bool):
        return str(default).lower()
    if isinstance(default, (list, tuple)):
        return ",".join(map(str, default))
    return "none" if default is None else str(default)


def with_default(help_text: str, default: Any) -> str:
    """The help with its default said once: a text that already says "(default: ...)" in words keeps its own."""
    return help_text if "(default:" in help_text else f"{help_text} (default: {show_default(default)})"


def field_help(cls: type) -> list[tuple[str, str, Any]]:
    """(flag, help, default) per field: the CLI help, and the option tables in docs/options.md."""
    return [("--" + f.name.replace("_", "-"), f.metadata.get("help", ""), default_of(f)) for f in ordered_fields(cls)]


# ---------------------------------------------------------------------------------------------
# The command line.


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line, `error: PROG: ...` on stderr and exit 2 (argparse's own
    contract, without the whole usage), naming the flag a misspelt one resembles. No abbreviations:
    flags are config keys, and a prefix (`--lr`) would bind to whichever key starts with it."""

    def __init__(self, *args: Any, unrecognized_hint: str = "", renamed: dict[str, str] | None = None,
                 **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        self.unrecognized_hint = unrecognized_hint  # what to add when a word is no flag of this command
        self.renamed = {k.replace("_", "-"): v.replace("_", "-") for k, v in (renamed or {}).items()}

    def error(self, message: str) -> typing.NoReturn:
        if "unrecognized arguments:" in message:
            message += self._did_you_mean(message) + (f" ({self.unrecognized_hint})" if self.unrecognized_hint else "")
        self.exit(2, f"error: {self.prog}: {message}; see `{self.prog} --help`\n")

    def _did_you_mean(self, message: str) -> str:
        known = {s[2:]: s for s in self._option_string_actions if s.startswith("--")}
        words = [w.split("=", 1)[0] for w in message.split("unrecognized arguments:", 1)[1].split()]
        guesses: list[str] = []
        for word in (w.lstrip("-").replace("_", "-") for w in words if w.startswith("-")):  # --learning_rate
            word = self.renamed.get(word, word)  # a renamed key's old flag: its new name
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
                              "help": with_default(f.metadata.get("help", ""), default_of(f)).replace("%", "%%")}
    if choices:
        kwargs["metavar"] = "{" + ",".join(map(str, choices)) + "}"
    if base is bool:
        kwargs["metavar"] = "true|false"
    if base is bool or (choices and "true" in choices):
        kwargs.update(nargs="?", const="true")
    group.add_argument(flag, **kwargs)


def build_parser(cls: type, prog: str, description: str) -> argparse.ArgumentParser:
    """One flag per field, in argument groups (`help_groups`); values stay strings here and are coerced with
    the field's type."""
    parser = Parser(prog=prog, description=description, usage="%(prog)s [--config FILE.yaml] [--FLAG VALUE ...]",
                    renamed=getattr(cls, "RENAMED", None))
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file of config keys (CLI flags win over it) "
                                                              "(default: none)")
    hints = typing.get_type_hints(cls)
    fields = ordered_fields(cls)
    for title in help_groups(cls):
        members = [f for f in fields if field_group(cls, f) == title]
        if members:
            group = parser.add_argument_group(title)
            for f in members:
                _add_field(group, f, hints[f.name])
    return parser


def _read_yaml(path: str, storage_options: str | None) -> Any:
    try:
        if "://" in path:  # a config beside the data (s3://...): fsspec, with the flags' storage options
            import fsspec

            with fsspec.open(path, "rt", **parse_options("storage_options", storage_options)) as fh:
                return yaml.safe_load(fh) or {}
        with open(path) as fh:
            return yaml.safe_load(fh) or {}
    except (OSError, ValueError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read the config file ({e})") from None


def parse_args(cls: type, argv: list[str], prog: str, description: str = "") -> Any:
    """defaults < YAML file < CLI flags."""
    args = build_parser(cls, prog, description).parse_args(argv)
    cfg = cls()
    if args.config:
        loaded = _read_yaml(args.config, getattr(args, "storage_options", None))
        if not isinstance(loaded, dict):
            raise ConfigError(f"{args.config}: expected a mapping of config keys, got {type(loaded).__name__}")
        cfg = from_mapping(cls, loaded, source=args.config)
    flags = {k: v for k, v in vars(args).items() if k != "config" and v is not None}
    return from_mapping(cls, flags, base=cfg, source="command line")


# ---------------------------------------------------------------------------------------------
# Written back: YAML, Markdown.


def public(cfg: Any) -> dict:
    """The config as a dict fit to write, its own keys first: storage options with their secrets redacted."""
    out = {f.name: getattr(cfg, f.name) for f in ordered_fields(type(cfg))}
    if out.get("storage_options"):
        out["storage_options"] = redact(out["storage_options"])
    return out


def to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(public(cfg), sort_keys=False)


def options_markdown(configs: dict[str, type], intro: list[str]) -> str:
    """One table per command (`pipeline.py COMMAND`), made from the dataclasses' help, after `intro`."""
    parts = ["# Options\n", *intro]
    for command, cls in configs.items():
        parts += [f"## `pipeline.py {command}`\n", "| group | flag / YAML key | default | meaning |",
                  "|---|---|---|---|"]
        parts += _option_rows(cls)
        parts.append("")
    return "\n".join(parts)


def _option_rows(cls: type) -> list[str]:
    """One table row per field, grouped as --help groups them; a Literal's values after its flag."""
    hints = typing.get_type_hints(cls)
    rows = []
    for title in help_groups(cls):
        for f in (f for f in ordered_fields(cls) if field_group(cls, f) == title):
            flag, key, choices = "--" + f.name.replace("_", "-"), f.name, _choices(hints[f.name])
            shown = f"`{flag}` `{{{','.join(map(str, choices))}}}`" if choices else f"`{flag}`"
            help_text = f.metadata.get("help", "").replace("|", "/")
            rows.append(f"| {title} | {shown} / `{key}` | `{show_default(default_of(f))}` | {help_text} |")
    return rows
