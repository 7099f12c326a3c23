"""Precompute stage: read -> normalise -> tokenize (Ray tasks) -> score (Ray actor pool) -> Parquet shards.

Every input row has a `row_key`: the hash of its raw content plus its occurrence number (the
k-th copy of the same row). A run skips rows whose key is already in the output (written or
rejected), and groups the remaining rows, in input order, into new shards of `rows_per_shard`
input rows. So re-running the same command after a crash finishes the job, re-running it after
the input grew scores only the new rows, and nothing is scored twice or lost.

Per shard the driver writes, in order, `rejects/shard-k.parquet`, `shards/shard-k.parquet` and
`_progress/shard-k.json`; the last marks the shard finished, and files without it are removed at
the next start. `manifest.json`, covering all finished shards, is written last.
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
import time
from collections import Counter, defaultdict
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.parquet as pq

from schemas import FORMAT_VERSION, REJECT_SCHEMA, SHARD_SCHEMA, validate_manifest, validate_table
from stages.core import storage
from stages.core.config import PrecomputeConfig, public, to_yaml
from stages.core.data import MalformedRow, check_columns, embedded_layout, read_rows, resolve_source
from stages.core.devices import threads_per_worker
from stages.core.errors import PipelineError
from stages.core.formats import RowRejected, detect, normalise
from stages.core.models import load_tokenizer, resolve_model, tokenizer_hashes, weights_hash
from stages.core.ray_runtime import init_ray
from stages.core.scorer import ReferenceScorer, tokenize_batch

ROW_GROUP_SIZE = 256  # rows per Parquet row group: the trainer's unit of streaming


class OutputMismatch(PipelineError):
    """The output folder holds work made with other settings."""


def pair_id(row: dict) -> str:
    """Content hash of the normalised prompt/chosen/rejected: stable across runs, file order and index."""
    body = json.dumps([row["prompt"], row["chosen"], row["rejected"], row.get("tools")],
                      sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(body.encode("utf-8")).hexdigest()[:32]


def _json(value) -> str:
    return json.dumps(value, ensure_ascii=False, default=str)


def pair_tokens(r: dict) -> int:
    """Tokens a plain scorer runs for a pair: the prompt once per answer."""
    return len(r["prompt_ids"]) * 2 + len(r["chosen_ids"]) + len(r["rejected_ids"])


def shard_name(k: int) -> str:
    return f"shard-{k:05d}"


def shard_index(file_name: str) -> int | None:
    """'shard-00012.parquet' or 'shard-00012.json' -> 12; None for any other name."""
    prefix, _, rest = file_name.partition("-")
    number = rest.split(".", 1)[0]
    return int(number) if prefix == "shard" and number.isdigit() else None


def content_hash(raw) -> str:
    """Hash of an input row's raw content (a malformed line's text)."""
    text = raw.text if isinstance(raw, MalformedRow) else json.dumps(raw, sort_keys=True, ensure_ascii=False,
                                                                     default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def _identity(cfg: PrecomputeConfig, model_path: str, tok_hashes: dict, w_hash: str) -> dict:
    """Everything that changes how a row is scored; a re-run must match it to add to an output.
    The data is not part of it: a re-run over grown data adds the new rows."""
    keys = ("format", "prompt_column", "chosen_column", "rejected_column", "max_length",
            "max_prompt_length", "truncation_mode", "dtype")
    ident = {k: getattr(cfg, k) for k in keys}
    ident.update(model=cfg.model, weights_hash=w_hash, **tok_hashes)
    return ident


def _check_output(cfg: PrecomputeConfig, identity: dict) -> None:
    run_file = storage.join(cfg.output, "_progress", "run.json")
    names = storage.list_names(cfg.output)
    if not names:
        return
    if cfg.overwrite:
        storage.remove_tree(cfg.output)
        return
    if not storage.exists(run_file):
        raise OutputMismatch(f"{cfg.output} exists and is not a precompute output (has: {', '.join(names[:10])}); "
                             "pass --overwrite to replace it")
    previous = storage.read_json(run_file)
    diff = {k: (previous.get(k), identity[k]) for k in identity if previous.get(k) != identity[k]}
    if diff:
        lines = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in diff.items())
        raise OutputMismatch(f"{cfg.output} was made with other settings ({lines}); "
                             "pass --overwrite to replace it, or choose another --output")


class _Plan:
    """New input rows grouped into new shards: rows to score, text-level rejects, rows read."""

    def __init__(self):
        self.records: list[dict] = []
        self.rejects: dict[int, list[dict]] = defaultdict(list)
        self.rows_read: Counter = Counter()
        self.expected: Counter = Counter()  # rows each new shard sends through the scorer
        self.already_done = 0               # rows whose key the output already holds


def _known(cfg: PrecomputeConfig, done: dict[int, dict]) -> tuple[set[str], dict[str, str]]:
    """Row keys (written or rejected) and pair ids already in the output."""
    keys, pairs = set(), {}
    for entry in done.values():
        for path, cols in ((entry["path"], ["row_key", "pair_id"]), (entry["rejects_path"], ["row_key"])):
            with storage.open_binary(storage.join(cfg.output, path)) as fh:
                table = pq.read_table(fh, columns=cols)
            keys.update(table.column("row_key").to_pylist())
            if "pair_id" in cols:
                pairs.update(dict.fromkeys(table.column("pair_id").to_pylist(), f"a pair already in {entry['path']}"))
    return keys, pairs


def _plan(cfg: PrecomputeConfig, done: dict[int, dict], known_keys: set[str], known_pairs: dict[str, str]) -> _Plan:
    plan, layout, copies = _Plan(), None, Counter()
    seen = dict(known_pairs)
    first = max(done) + 1 if done else 0
    new_rows = 0
    for index, raw in read_rows(cfg.data, cfg.split, cfg.limit):
        if layout is None and not isinstance(raw, MalformedRow):
            layout = cfg.format if cfg.format != "auto" else (embedded_layout(cfg.data) or detect(raw))
            check_columns(raw, layout, cfg)
        # row_key: the content and which copy of it this is, so a new duplicate row is new work
        # (and becomes a 'duplicate' reject) while the same row read again is not.
        h = content_hash(raw)
        key = f"{h}:{copies[h]}"
        copies[h] += 1
        if key in known_keys:
            plan.already_done += 1
            continue
        k = first + new_rows // cfg.rows_per_shard
        new_rows += 1
        plan.rows_read[k] += 1
        try:
            if isinstance(raw, MalformedRow):
                raise RowRejected("malformed_json", f"{raw.file} line {raw.line}: {raw.error}")
            row = normalise(raw, layout, cfg)
            pid = pair_id(row)
            if pid in seen:
                raise RowRejected("duplicate", f"same prompt/chosen/rejected as {seen[pid]}")
            seen[pid] = f"source_index {index}"
        except RowRejected as e:
            text = raw.text if isinstance(raw, MalformedRow) else _json(raw)
            plan.rejects[k].append({"source_index": index, "row_key": key, "reason": e.reason, "detail": e.detail,
                                    "row": text})
            continue
        plan.records.append({"pair_id": pid, "row_key": key, "source_index": index, "shard": k,
                             "row_json": _json(row)})
        plan.expected[k] += 1
    return plan


def _done_shards(cfg: PrecomputeConfig) -> dict[int, dict]:
    """Finished shards by index; shard and reject files a killed run left unfinished are removed."""
    done = {}
    for name in storage.list_names(storage.join(cfg.output, "_progress")):
        k = shard_index(name)
        if k is not None and name.endswith(".json"):
            done[k] = storage.read_json(storage.join(cfg.output, "_progress", name))
    for folder in ("shards", "rejects"):
        for name in storage.list_names(storage.join(cfg.output, folder)):
            if shard_index(name) not in done:
                storage.remove(storage.join(cfg.output, folder, name))
    return done


def _parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=ROW_GROUP_SIZE, compression="zstd")
    return buf.getvalue()


def _write_shard(cfg: PrecomputeConfig, k: int, rows: list[dict], rejects: list[dict], rows_read: int) -> dict:
    rows = sorted(rows, key=lambda r: r["source_index"])
    rejects = sorted(rejects, key=lambda r: r["source_index"])
    table = pa.Table.from_pylist([{f: r[f] for f in SHARD_SCHEMA.names} for r in rows], schema=SHARD_SCHEMA)
    validate_table(table, SHARD_SCHEMA, shard_name(k))
    rej_table = pa.Table.from_pylist(rejects, schema=REJECT_SCHEMA)
    data = _parquet_bytes(table)
    idx = [r["source_index"] for r in rows] + [r["source_index"] for r in rejects]
    storage.write_bytes_atomic(storage.join(cfg.output, "rejects", shard_name(k) + ".parquet"),
                               _parquet_bytes(rej_table))
    storage.write_bytes_atomic(storage.join(cfg.output, "shards", shard_name(k) + ".parquet"), data)
    entry = {"path": f"shards/{shard_name(k)}.parquet", "rows": table.num_rows, "sha256": storage.sha256_bytes(data),
             "source_indices": [min(idx), max(idx)] if idx else None, "data": cfg.data, "rows_read": rows_read,
             "rejects_path": f"rejects/{shard_name(k)}.parquet", "rejects": len(rejects),
             "rejects_by_reason": dict(Counter(r["reason"] for r in rejects)),
             "tokens": sum(pair_tokens(r) for r in rows),
             "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    storage.write_json(storage.join(cfg.output, "_progress", shard_name(k) + ".json"), entry, indent=None)
    return entry


def _score(cfg: PrecomputeConfig, model_path: str, plan: _Plan, on_shard, progress) -> None:
    """Run the Ray pipeline over pending rows; call on_shard(k, rows) as each shard completes."""
    import ray
    import ray.data

    # Actors take one logical CPU each; one more for the read/tokenize tasks so they never starve
    # behind the scorers (Ray Data otherwise stalls on a 2-core machine).
    init_ray(cfg.num_workers + 1)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.enable_auto_log_stats = False
    use_gpu = ray.cluster_resources().get("GPU", 0) > 0
    # Small blocks keep every actor busy and the progress bar moving; shards complete as they arrive.
    blocks = min(len(plan.records), max(2 * cfg.num_workers, -(-len(plan.records) // max(cfg.batch_size, 8))))
    ds = ray.data.from_items(plan.records, override_num_blocks=blocks)
    # batch_size=None: one call per block, so blocks are not merged and every actor gets work.
    ds = ds.map_batches(tokenize_batch, batch_format="pyarrow", batch_size=None, num_cpus=0.5,
                        fn_kwargs=dict(model_path=model_path, max_length=cfg.max_length,
                                       max_prompt_length=cfg.max_prompt_length, truncation_mode=cfg.truncation_mode))
    ds = ds.map_batches(ReferenceScorer, batch_format="pyarrow", batch_size=cfg.batch_size,
                        compute=ray.data.ActorPoolStrategy(size=cfg.num_workers), num_gpus=1 if use_gpu else 0,
                        num_cpus=1,
                        fn_constructor_kwargs=dict(model_path=model_path, dtype=cfg.dtype, max_length=cfg.max_length,
                                                   truncation_mode=cfg.truncation_mode, pack_prompts=cfg.pack_prompts,
                                                   threads=None if use_gpu else threads_per_worker(cfg.num_workers)))
    pending: dict[int, list[dict]] = defaultdict(list)
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        recs = batch.to_pylist()
        for r in recs:
            pending[r["shard"]].append(r)
            if len(pending[r["shard"]]) == plan.expected[r["shard"]]:
                on_shard(r["shard"], pending.pop(r["shard"]))
        progress(recs)
    if pending:
        raise RuntimeError(f"shards {sorted(pending)} did not receive all their rows")


def run(cfg: PrecomputeConfig) -> dict:
    """Run the stage; returns the manifest."""
    started = time.time()
    storage.configure(cfg.storage_options_dict)
    model_path = resolve_model(cfg.model)
    tokenizer = load_tokenizer(model_path)
    tok_hashes = tokenizer_hashes(tokenizer)
    w_hash = weights_hash(model_path)
    identity = _identity(cfg, model_path, tok_hashes, w_hash)
    _check_output(cfg, identity)
    storage.write_json(storage.join(cfg.output, "_progress", "run.json"), identity)
    storage.write_bytes_atomic(storage.join(cfg.output, "config.yaml"), to_yaml(cfg).encode())

    for folder in ("shards", "rejects", "_progress"):
        storage.remove_partials(storage.join(cfg.output, folder))
    done = _done_shards(cfg)
    known_keys, known_pairs = _known(cfg, done)
    plan = _plan(cfg, done, known_keys, known_pairs)
    pair_ids = list(known_pairs)  # the manifest's fingerprint: old shards' ids plus each new shard's
    todo = sorted(plan.rows_read)
    stats = {"pairs": 0, "tokens": 0}  # rows through the scorer this run (token-level rejects included)

    def on_shard(k: int, results: list[dict]) -> None:
        rows = [r for r in results if r["reject_reason"] is None]
        rejects = plan.rejects.pop(k, []) + [
            {"source_index": r["source_index"], "row_key": r["row_key"], "reason": r["reject_reason"],
             "detail": r["reject_detail"], "row": r["row_json"]} for r in results if r["reject_reason"] is not None]
        done[k] = _write_shard(cfg, k, rows, rejects, plan.rows_read[k])
        pair_ids.extend(r["pair_id"] for r in rows)

    bar = None
    if cfg.progress and plan.records:
        from tqdm import tqdm

        bar = tqdm(total=len(plan.records), unit="pair", desc="reference log-probs", file=sys.stderr,
                   dynamic_ncols=True)

    def progress(recs: list[dict]) -> None:
        stats["pairs"] += len(recs)
        stats["tokens"] += sum(pair_tokens(r) for r in recs)
        if bar is not None:
            elapsed = max(time.time() - started, 1e-9)
            bar.set_postfix_str(f"{stats['pairs'] / elapsed:.1f} pairs/s, {stats['tokens'] / elapsed:.0f} tok/s")
            bar.update(len(recs))

    # Shards where every row was rejected before tokenizing need no scoring.
    for k in todo:
        if plan.expected[k] == 0:
            on_shard(k, [])
    if plan.records:
        try:
            _score(cfg, model_path, plan, on_shard, progress)
        finally:
            if bar is not None:
                bar.close()
    last_run = {"seconds": round(time.time() - started, 3), "data": cfg.data, "pairs_scored": stats["pairs"],
                "tokens_scored": stats["tokens"], "new_shards": len(todo), "rows_already_done": plan.already_done}
    return _manifest(cfg, model_path, identity, done, pair_ids, last_run)


def _manifest(cfg: PrecomputeConfig, model_path: str, identity: dict, done: dict[int, dict], pair_ids: list[str],
              last_run: dict) -> dict:
    shards = [done[k] for k in sorted(done)]
    reasons: Counter = Counter()
    for s in shards:
        reasons.update(s["rejects_by_reason"])
    manifest = {
        "format_version": FORMAT_VERSION,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "reference_model": {"name": cfg.model, "path": model_path, "weights_hash": identity["weights_hash"]},
        "tokenizer_hash": identity["tokenizer_hash"],
        "chat_template_hash": identity["chat_template_hash"],
        "data_source": cfg.data,
        "data_sources": sorted({s["data"] for s in shards}),
        "data_path": resolve_source(cfg.data),
        "pair_ids_fingerprint": hashlib.sha256("\n".join(sorted(pair_ids)).encode()).hexdigest(),
        "max_length": cfg.max_length,
        "max_prompt_length": cfg.max_prompt_length,
        "truncation_mode": cfg.truncation_mode,
        "dtype": cfg.dtype,
        "rows_read": sum(s["rows_read"] for s in shards),
        "rows_written": sum(s["rows"] for s in shards),
        "rows_rejected": sum(s["rejects"] for s in shards),
        "rejects_by_reason": dict(sorted(reasons.items())),
        "tokens": sum(s["tokens"] for s in shards),
        "shards": shards,
        "config": public(cfg),
        "last_run": last_run,  # what this invocation did: re-runs skip finished shards
    }
    validate_manifest(manifest)
    storage.write_json(storage.join(cfg.output, "manifest.json"), manifest)
    return manifest


def summary(manifest: dict, output: str) -> str:
    run = manifest["last_run"]
    secs = run["seconds"] or 1e-9
    lines = [
        f"precompute: {output}",
        f"  rows read {manifest['rows_read']}, written {manifest['rows_written']}, rejected {manifest['rows_rejected']}"
        + (f" ({', '.join(f'{k}: {v}' for k, v in manifest['rejects_by_reason'].items())})"
           if manifest['rejects_by_reason'] else ""),
        f"  {len(manifest['shards'])} shards, {manifest['tokens']} tokens, model {manifest['reference_model']['name']}"
        f" ({manifest['dtype']})",
        f"  this run: {run['pairs_scored']} pairs scored into {run['new_shards']} new shards, "
        f"{run['rows_already_done']} rows already done, "
        f"{secs:.1f}s ({run['pairs_scored'] / secs:.2f} pairs/s, {run['tokens_scored'] / secs:.0f} tokens/s)",
    ]
    return "\n".join(lines)
