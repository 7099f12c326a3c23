"""manifest.json, typed: what a precompute output holds, by which model, with which settings.

The JSON keys are a contract (users read them with `json`, `schemas/manifest.py` lists them and
checks them without this package), so a `Manifest` writes back exactly the keys it read: optional
keys an older output lacks stay absent (their attributes give defaults), and keys this code does not
know survive a read and write in `extra`. Library code reads attributes; only this package knows
the key names (tests/test_refs_house.py).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from schemas import FORMAT_VERSION, SchemaError, validate_manifest
from stages.core import storage
from stages.core.scoring.truncation import Truncation

_TRUNCATION_KEYS = tuple(Truncation().to_json())  # max_length, max_prompt_length, truncation_mode


class _Json:
    """A JSON object as a frozen dataclass: each key of `KEYS` is a field of the same name (written in
    that order), `NESTED` names the fields held as their own type. A key a read lacked is recorded in
    `absent` and not written back; keys outside `KEYS` are kept in `extra` and written after them."""

    KEYS: ClassVar[tuple[str, ...]] = ()
    NESTED: ClassVar[dict[str, Any]] = {}

    @classmethod
    def _kwargs(cls, values: dict) -> dict:
        kwargs = {k: cls._load(k, values[k]) for k in cls.KEYS if k in values}
        kwargs["absent"] = frozenset(k for k in cls.KEYS if k not in values)
        kwargs["extra"] = {k: v for k, v in values.items() if k not in cls.KEYS}
        return kwargs

    @classmethod
    def _load(cls, key: str, value):
        nested = cls.NESTED.get(key)
        if nested is None or value is None:
            return value
        return tuple(map(nested.from_json, value)) if isinstance(value, list) else nested.from_json(value)

    @classmethod
    def from_json(cls, values: dict):
        return cls(**cls._kwargs(values))

    def _dump(self, key: str):
        value = getattr(self, key)
        if isinstance(value, tuple) and key in self.NESTED:
            return [v.to_json() for v in value]
        return value.to_json() if isinstance(value, _Json) else value

    def to_json(self) -> dict:
        out = {k: self._dump(k) for k in self.KEYS if k not in self.absent}
        out.update(self.extra)
        return out


@dataclass(frozen=True)
class ReferenceModel(_Json):
    KEYS: ClassVar = ("name", "path", "weights_hash")
    name: str = ""
    path: str = ""
    weights_hash: str = ""
    absent: frozenset = field(default=frozenset(), repr=False, compare=False)
    extra: dict = field(default_factory=dict, repr=False)


@dataclass(frozen=True)
class ShardEntry(_Json):
    """One finished shard (also its marker `_progress/shard-k.json`). Outputs written before bytes,
    source, rejects_sha256 and rejects_bytes existed lack them (None)."""

    KEYS: ClassVar = ("path", "rows", "bytes", "sha256", "source_indices", "data", "source", "rows_read",
                      "rejects_path", "rejects", "rejects_sha256", "rejects_bytes", "rejects_by_reason", "tokens",
                      "keys_path", "pair_ids_sum", "finished_at")
    path: str = ""
    rows: int = 0
    bytes: int | None = None            # the shard file's size
    sha256: str = ""
    source_indices: list | None = None  # [first, last] input row, or None
    data: str | None = None             # the --data it came from
    source: str | None = None           # that --data as an absolute path where local
    rows_read: int | None = None
    rejects_path: str | None = None
    rejects: int = 0
    rejects_sha256: str | None = None
    rejects_bytes: int | None = None
    rejects_by_reason: dict = field(default_factory=dict)
    tokens: int = 0
    keys_path: str | None = None
    pair_ids_sum: str | None = None     # sum mod 2**256 of sha256(pair_id) over its pairs, hex
    finished_at: str | None = None
    absent: frozenset = field(default=frozenset(), repr=False, compare=False)
    extra: dict = field(default_factory=dict, repr=False)


@dataclass(frozen=True)
class LastRun(_Json):
    """What the invocation that wrote the manifest did (re-runs skip finished shards)."""

    KEYS: ClassVar = ("seconds", "data", "pairs_written", "rows_rejected", "pairs_scored", "tokens_scored",
                      "new_shards", "shards_repaired", "rows_already_done")
    seconds: float = 0.0
    data: str | None = None
    pairs_written: int = 0
    rows_rejected: int = 0
    pairs_scored: int = 0   # the name older readers know: = pairs_written
    tokens_scored: int = 0
    new_shards: int = 0
    shards_repaired: list = field(default_factory=list)
    rows_already_done: int = 0
    absent: frozenset = field(default=frozenset(), repr=False, compare=False)
    extra: dict = field(default_factory=dict, repr=False)


@dataclass(frozen=True)
class Manifest(_Json, Mapping):
    """manifest.json at the output root. The truncation keys (max_length, max_prompt_length,
    truncation_mode) are one field, `truncation`."""

    KEYS: ClassVar = ("format_version", "created_at", "reference_model", "tokenizer_hash", "chat_template_hash",
                      "data_source", "data_sources", "data_path", "kind", "pair_ids_fingerprint",
                      *_TRUNCATION_KEYS, "dtype", "rows_read", "rows_written", "rows_rejected",
                      "rejects_by_reason", "tokens", "shards", "config", "last_run", "kl_pairing",
                      "input_rows_read")
    NESTED: ClassVar = {"reference_model": ReferenceModel, "shards": ShardEntry, "last_run": LastRun}
    format_version: int = FORMAT_VERSION
    created_at: str = ""
    reference_model: ReferenceModel = ReferenceModel()
    tokenizer_hash: str = ""
    chat_template_hash: str = ""
    data_source: str = ""
    data_sources: list | None = None   # every --data the output was grown from (older: data_source only)
    data_path: str | None = None       # the resolved input
    kind: str = "paired"               # paired | unpaired (older outputs: paired, no key)
    pair_ids_fingerprint: str = ""     # sum mod 2**256 of sha256(pair_id) over all pairs, 64 hex digits
    truncation: Truncation = Truncation()
    dtype: str = ""
    rows_read: int = 0                 # in the shards' units: examples under --unpair
    rows_written: int = 0
    rows_rejected: int = 0
    rejects_by_reason: dict = field(default_factory=dict)
    tokens: int | None = None
    shards: tuple[ShardEntry, ...] = ()
    config: dict = field(default_factory=dict)
    last_run: LastRun | None = None
    kl_pairing: dict | None = None     # unpaired: {"scope", "seed", "method"}
    input_rows_read: int | None = None  # input rows (rows_read counts two examples per row under --unpair)
    absent: frozenset = field(default=frozenset(), repr=False, compare=False)
    extra: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls, values: dict, name: str = "manifest.json") -> Manifest:
        """Check the keys (SchemaError naming the first wrong one), then type them."""
        validate_manifest(values, name)
        kwargs = cls._kwargs(values)
        for key in _TRUNCATION_KEYS:  # required keys: never absent
            kwargs.pop(key)
        try:
            truncation = Truncation.from_json(values)
        except ValueError as e:  # an edited truncation_mode
            raise SchemaError(f"{name}: key 'truncation_mode': {e}") from None
        return cls(**kwargs, truncation=truncation)

    def _dump(self, key: str):
        if key in _TRUNCATION_KEYS:
            return self.truncation.to_json()[key]
        return super()._dump(key)

    def to_json(self) -> dict:
        out = super().to_json()
        validate_manifest(out)
        return out

    @classmethod
    def read(cls, url: str) -> Manifest:
        """The manifest at `url`: FileNotFoundError, json.JSONDecodeError or SchemaError (naming the url)."""
        return cls.from_json(json.loads(storage.read_bytes(url)), url)

    def write(self, url: str) -> None:
        storage.write_json(url, self.to_json())

    def validate(self) -> None:
        """Raise SchemaError naming the first missing or mistyped key, or broken row accounting."""
        self.to_json()

    def replace(self, **changes) -> Manifest:
        return dataclasses.replace(self, **changes)

    @property
    def contents(self) -> str:
        """What the refs hold, as one hash: the pairs (their id fingerprint and count) and every shard's
        path and checksum. A trainer pins it: a precompute that adds, repairs or replaces shards changes it;
        a re-run that changes nothing does not."""
        parts = [self.kind, self.pair_ids_fingerprint, str(self.rows_written)] + \
            [f"{s.path}:{s.sha256}" for s in sorted(self.shards, key=lambda s: s.path)]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()

    @property
    def sources(self) -> list[str]:
        """Every --data the output holds pairs from (older outputs record only data_source)."""
        return list(self.data_sources or [self.data_source])

    @property
    def input_rows(self) -> int:
        """Input rows read (rows_read counts examples under --unpair; older outputs: rows_read)."""
        return self.rows_read if self.input_rows_read is None else self.input_rows_read

    @property
    def unpaired_input(self) -> bool:
        """Whether the output was made with --unpair (pairs turned into unpaired examples)."""
        return bool(self.config.get("unpair"))

    # A read-only JSON view (`manifest.json`'s keys, as a Mapping) for scripts and tests written against
    # the dict `precompute.run` used to return; library code reads attributes (tests/test_refs_house.py).
    @functools.cached_property
    def _view(self) -> dict:
        return self.to_json()

    def __getitem__(self, key: str):
        return self._view[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._view)

    def __len__(self) -> int:
        return len(self._view)


def shard_entries(values: list[dict]) -> list[ShardEntry]:
    return [ShardEntry.from_json(v) for v in values]


__all__ = ["Manifest", "ShardEntry", "ReferenceModel", "LastRun", "SchemaError", "shard_entries"]
