"""The precompute output folder's bookkeeping, between runs: its identity (`_progress/run.json`), the
markers and keys files of finished shards, the damage check, the repair of damaged or unfinished
shards, and the manifest that covers the finished ones.

    OUTPUT/shards/shard-k.parquet      scored rows          OUTPUT/rejects/shard-k.parquet  rejects
    OUTPUT/_progress/shard-k.json      marker: k finished, its manifest entry (a ShardEntry)
    OUTPUT/_progress/shard-k.keys.parquet   its input rows' keys (what a repair scores again)
    OUTPUT/_progress/run.json          the identity: settings a re-run must match
    OUTPUT/manifest.json               written last, over every finished shard
"""

from __future__ import annotations

import os
from collections import Counter
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.parquet as pq

from schemas import FORMAT_VERSION
from stages.core import console, storage
from stages.core.config.engine import public
from stages.core.lease import LEASE_FILE
from stages.core.refs.identity import OutputMismatch, check_same
from stages.core.refs.manifest import LastRun, Manifest, ReferenceModel, ShardEntry
from stages.core.refs.plan import KL_PAIRING
from stages.core.refs.writer import fingerprint, keys_path, parquet_bytes, shard_index, shard_name
from stages.core.scoring.truncation import Truncation

RUN_FILE = "_progress/run.json"
IDENTITY_KEYS = ("format", "prompt_column", "chosen_column", "rejected_column", "max_length",
                 "max_prompt_length", "truncation_mode", "dtype")
ADVICE = "pass --overwrite to replace it, or choose another --output"


def identity(cfg, tok_hashes: dict, w_hash: str) -> dict:
    """Everything that changes how a row is scored; a re-run must match it to add to an output.
    The data is not part of it: a re-run over grown data adds the new rows."""
    ident = {k: getattr(cfg, k) for k in IDENTITY_KEYS}
    ident.update(model=cfg.model, weights_hash=w_hash, **tok_hashes)
    return ident


def source_name(data: str) -> str:
    """--data as a comparable name: a local path made absolute and real (`in.jsonl` run from /w and
    `/w/in.jsonl` are one source), anything else (a URL, a hub or embedded name) as given."""
    path = data[len("file://"):] if data.startswith("file://") else data
    if "://" in path or not os.path.exists(path):
        return data
    return os.path.realpath(path)


def check_source(cfg, markers: dict[int, ShardEntry | None]) -> None:
    """Refuse a second data set unless --append. The identity leaves the data out (a grown input
    adds its new rows), so without this check another --data would be added to the output silently."""
    sources = {m.source or source_name(m.data): m.data for m in markers.values() if m}
    if cfg.append or not sources or source_name(cfg.data) in sources:
        return
    raise OutputMismatch(f"{cfg.output} holds pairs from {', '.join(sorted(set(sources.values())))}, not from "
                         f"{cfg.data}; pass --append to add this data set to it, --overwrite to replace it, "
                         "or choose another --output")


def check_output(cfg, ident: dict) -> None:
    """An output folder that is empty, or made with these settings; with --overwrite emptied first."""
    names = [n for n in storage.list_names(cfg.output) if n != LEASE_FILE]
    if not names:
        return
    if cfg.overwrite:
        for name in names:  # everything but this run's lease
            storage.remove_tree(storage.join(cfg.output, name))
        return
    run_file = storage.join(cfg.output, RUN_FILE)
    if not storage.exists(run_file):
        raise OutputMismatch(f"{cfg.output} exists and is not a precompute output (has: {', '.join(names[:10])}); "
                             "pass --overwrite to replace it")
    check_same(cfg.output, "reference log-probs", storage.read_json(run_file), ident, ADVICE)


def with_kind(cfg, ident: dict, layout: str) -> dict:
    """The identity with the output's kind: paired (preference pairs) or unpaired (KTO examples, with
    the settings of their KL pairing). An output holds one kind; a run of the other is refused."""
    kind = "unpaired" if layout == "unpaired" else "paired"
    full = {**ident, "kind": kind}
    if kind == "unpaired":
        full.update(completion_column=cfg.completion_column, label_column=cfg.label_column, kl_seed=cfg.kl_seed)
    if cfg.unpair:
        full["unpair"] = True
    run_file = storage.join(cfg.output, RUN_FILE)
    if storage.exists(run_file):
        previous = storage.read_json(run_file)
        before = previous.get("kind", "paired")
        if before != kind:
            raise OutputMismatch(f"{cfg.output} holds {before} data and {cfg.data} is {kind} ({layout} rows): an "
                                 "output holds one kind; choose another --output")
        check_same(cfg.output, "reference log-probs", previous, full, ADVICE, [k for k in full if k not in ident])
    return full


def write_identity(output: str, ident: dict) -> None:
    storage.write_json(storage.join(output, RUN_FILE), ident)


def read_markers(output: str) -> dict[int, ShardEntry | None]:
    """`_progress/shard-k.json` by k, without the row keys older markers held; None for a marker that is
    not readable JSON."""
    markers: dict[int, ShardEntry | None] = {}
    for name in storage.list_names(storage.join(output, "_progress")):
        k = shard_index(name)
        if k is not None and name == shard_name(k) + ".json":
            try:
                values = storage.read_json(storage.join(output, "_progress", name))
            except ValueError:  # markers are written atomically: only a hand or a disk fault breaks one
                markers[k] = None
                continue
            values.pop("row_keys", None)
            markers[k] = ShardEntry.from_json(values)
    return markers


def keys_files(output: str) -> set[int]:
    names = storage.list_names(storage.join(output, "_progress"))
    return {k for k in map(shard_index, names) if k is not None and shard_name(k) + ".keys.parquet" in names}


def _remove_if_there(url: str) -> None:
    try:
        storage.remove(url)
    except FileNotFoundError:
        pass


def _keep_old_keys(output: str, k: int) -> None:
    """An older marker holds its shard's row keys itself: move them into the keys file before the marker goes."""
    try:
        keys = storage.read_json(storage.join(output, "_progress", shard_name(k) + ".json")).get("row_keys")
    except (FileNotFoundError, ValueError):
        return
    if keys:
        table = pa.table({"row_key": pa.array(keys, pa.string())})
        storage.write_bytes_atomic(storage.join(output, keys_path(k)), parquet_bytes(table))


def verify(output: str, markers: dict[int, ShardEntry | None]) -> tuple[dict[int, ShardEntry], list[str]]:
    """Finished shards whose files match their marker, by index, and the names of the others. Each
    other shard is said (a `precompute: repairing ...` line on the console channel) and removed, files
    first and marker last (a repair killed half-way is found and done again); its keys file stays, so
    that the run puts its rows back into it."""
    done, repaired = {}, []
    for k in sorted(markers):
        entry = markers[k]
        problems = damaged_files(output, entry) if entry else [f"_progress/{shard_name(k)}.json: not readable"]
        if not problems:
            done[k] = entry
            continue
        rows = entry.rows_read if entry and entry.rows_read is not None else "unknown number of"
        console.say("precompute", f"repairing {shard_name(k)} ({'; '.join(problems)}): scoring its {rows} input "
                    "rows again")
        if not storage.exists(storage.join(output, keys_path(k))):
            _keep_old_keys(output, k)
        for path in (entry.path if entry else None, entry.rejects_path if entry else None,
                     f"_progress/{shard_name(k)}.json"):
            if path:
                _remove_if_there(storage.join(output, path))
        repaired.append(shard_name(k))
    return done, repaired


def remove_unfinished(output: str, done: dict[int, ShardEntry]) -> None:
    """Shard and reject files a killed run left without a marker."""
    for folder in ("shards", "rejects"):
        for name in storage.list_names(storage.join(output, folder)):
            if shard_index(name) not in done:
                storage.remove(storage.join(output, folder, name))


def known_files(done: dict[int, ShardEntry], redo: set[int]) -> list[dict]:
    """The output's files the plan reads: finished shards' row keys and pair ids, the keys of shards to redo."""
    files = [{"what": what, "path": path, "shard": k} for k, e in sorted(done.items())
             for what, path in (("shard", e.path), ("rejects", e.rejects_path)) if path]
    return files + [{"what": "redo", "path": keys_path(k), "shard": k} for k in sorted(redo)]


def entry_index(entry: ShardEntry) -> int:
    return shard_index(entry.path.rsplit("/", 1)[-1])


def _file_problem(root: str, path: str, size: int | None, sha256: str | None) -> str | None:
    """What is wrong with one file of a shard, or None: missing, another size, another checksum."""
    try:
        with storage.open_binary(storage.join(root, path)) as fh:
            h = storage.hash_stream(fh)
            n = fh.tell()  # read to the end: its size
    except FileNotFoundError:
        return f"{path}: missing"
    if size is not None and n != size:
        return f"{path}: {n} bytes, expected {size}"
    if sha256 is not None and h.hexdigest() != sha256:
        return f"{path}: sha256 {h.hexdigest()[:12]}... differs from the recorded {sha256[:12]}..."
    if sha256 is None:  # rejects files of older outputs have no checksum: they must at least be Parquet
        try:
            with storage.open_binary(storage.join(root, path)) as fh:
                pq.read_metadata(fh)
        except Exception as e:  # pyarrow raises several types for a damaged file
            return f"{path}: not readable Parquet ({type(e).__name__})"
    return None


def damaged_files(root: str, entry: ShardEntry) -> list[str]:
    """One line per file of a shard entry (its shard and rejects file) that does not match the
    entry; empty when both do."""
    checks = [(entry.path, entry.bytes, entry.sha256)]
    if entry.rejects_path:
        checks.append((entry.rejects_path, None, entry.rejects_sha256))
    return [p for p in (_file_problem(root, *check) for check in checks) if p]


def build_manifest(cfg, model_path: str, ident: dict, shards: list[ShardEntry], pair_id_sums: list[int],
                   last_run: dict, input_rows: int | None, data_path: str) -> Manifest:
    """The manifest over the finished shards (`shards`, in index order); `input_rows`: the input rows
    behind them under --unpair (rows_read counts examples there), else None."""
    reasons: Counter = Counter()
    for s in shards:
        reasons.update(s.rejects_by_reason)
    kind = ident.get("kind", "paired")
    rows_read = sum(s.rows_read for s in shards)
    absent = frozenset() if kind == "unpaired" else frozenset({"kl_pairing"})
    return Manifest(
        format_version=FORMAT_VERSION, created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        reference_model=ReferenceModel(cfg.model, model_path, ident["weights_hash"]),
        tokenizer_hash=ident["tokenizer_hash"], chat_template_hash=ident["chat_template_hash"],
        data_source=cfg.data, data_sources=sorted({s.data for s in shards}), data_path=data_path, kind=kind,
        pair_ids_fingerprint=fingerprint(pair_id_sums),
        truncation=Truncation(cfg.max_length, cfg.max_prompt_length, cfg.truncation_mode), dtype=cfg.dtype,
        rows_read=rows_read, rows_written=sum(s.rows for s in shards),
        rows_rejected=sum(s.rejects for s in shards), rejects_by_reason=dict(sorted(reasons.items())),
        tokens=sum(s.tokens for s in shards), shards=tuple(shards), config=public(cfg),
        last_run=LastRun.from_json(last_run),  # what this invocation did: re-runs skip finished shards
        kl_pairing={"scope": "shard", "seed": cfg.kl_seed, "method": KL_PAIRING} if kind == "unpaired" else None,
        # rows_read counts in the shards' units: with --unpair an example (two per input row) or a row
        # rejected whole, so that rows_read = rows_written + rows_rejected; this is the input's count.
        input_rows_read=rows_read if input_rows is None else input_rows, absent=absent)
