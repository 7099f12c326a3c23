"""Identity: "was this output made with the same settings?", one check and one error shape for every
command that keeps its output between runs (precompute's refs, generate's candidates, judge's pairs)."""

from __future__ import annotations

from stages.core.config.engine import ConfigError

SHOWN = 6  # differing settings shown with their values; the rest by name (a list of checksums is long)


class OutputMismatch(ConfigError):
    """The output folder holds work made with other settings, or from another data set."""


def differences(previous: dict, current: dict, keys=None) -> dict[str, tuple]:
    """{key: (old, new)} for each key of `keys` (default: all of `current`) whose value differs."""
    return {k: (previous.get(k), current[k]) for k in (current if keys is None else keys)
            if previous.get(k) != current[k]}


def describe(diff: dict[str, tuple]) -> str:
    """`key: old -> new; ...` (the first SHOWN with values, then the other keys' names)."""
    lines = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in list(diff.items())[:SHOWN])
    rest = list(diff)[SHOWN:]
    return lines + (f"; and {', '.join(rest)}" if rest else "")


def check_same(output: str, holds: str, previous: dict, current: dict, advice: str, keys=None) -> None:
    """Raise OutputMismatch when `previous` (what the output records) differs from `current` in a key
    of `keys` (default: all of `current`): '{output} holds {holds} made with other settings (...); {advice}'."""
    diff = differences(previous, current, keys)
    if diff:
        raise OutputMismatch(f"{output} holds {holds} made with other settings ({describe(diff)}); {advice}")
