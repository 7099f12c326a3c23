"""Precompute stage: read -> normalise -> tokenize (Ray tasks) -> score (Ray actor pool) -> Parquet shards.

Every input row has a `row_key`: the hash of its raw content plus its occurrence number (the
k-th copy of the same row). A run skips rows whose key is already in the output (written or
rejected), and groups the remaining rows, in input order, into new shards of `rows_per_shard`
input rows. So re-running the same command after a crash finishes the job, re-running it after
the input grew scores only the new rows, and nothing is scored twice or lost.

Per shard the driver writes, in order, `rejects/shard-k.parquet`, `shards/shard-k.parquet` and
`_progress/shard-k.json`; the last marks the shard finished, and files without it are removed at
the next start. `manifest.json`, covering all finished shards, is written last.

The marker is the shard's manifest entry (with the size and sha256 of its shard file and the sha256
of its rejects file) plus the row keys the shard covers. Every run first checks each finished shard's
files against its marker: a shard whose files are missing or damaged is no longer finished. Its
files and marker are removed (one line on stderr says so) and its input rows, found by row key, are
scored again into a shard of the same index k. A marker written before markers held row keys, or a
repair killed before it finished, leaves no keys behind: those rows are then new work and go into
new shards after the last one. Either way every input row ends up in the output exactly once.

The settings that decide how a row is scored must match the output's (`_progress/run.json`); the
data is not one of them, so that a re-run over grown input adds the new rows. A different data set
(another --data than the ones the output's shards came from) is refused unless --append.

A scorer process that dies (the OOM killer, a kill by hand) fails its Ray pool at once (the pool
runs without Ray's actor restarts); the run keeps the shards it finished, starts a new pool for
the rest, and gives up after SCORER_ATTEMPTS pools with one line: re-running then finishes the job.

A run after which the output holds no pair at all (empty input, every row rejected) fails with one
line giving the reject counts, after writing the rejects and manifest so that `inspect` can show them.
"""

from __future__ import annotations

import hashlib
import inspect
import io
import json
import os
import sys
import threading
import time
import warnings
from collections import Counter, defaultdict
from contextlib import contextmanager, nullcontext
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
from stages.core.ray_runtime import init_ray, quiet_ray_data
from stages.core.scorer import PairProgress, ReferenceScorer, tokenize_batch
from stages.inspect_refs import damaged_files

ROW_GROUP_SIZE = 256  # rows per Parquet row group: the trainer's unit of streaming
SCORER_ATTEMPTS = 3   # scorer pools one run starts: a pool fails as a whole when one of its processes dies
POLL_SECONDS = 0.5    # how often the progress bar asks the scorers how far they are


class OutputMismatch(PipelineError):
    """The output folder holds work made with other settings, or from another data set."""


class NothingWritten(PipelineError):
    """The run ended with no usable pair in the output: empty input, or every row rejected."""


class ScorerDied(PipelineError):
    """Scorer processes kept dying; the finished shards are kept and a re-run scores the rest."""


class NotEnoughGpus(PipelineError):
    """--gpus-per-worker K above 1 on a Ray cluster without a node with K GPUs for each scorer."""


class _PoolLost(Exception):
    """A scorer process of this pool died (internal: the run retries with a new pool)."""


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


def _say(message: str) -> None:
    """A line on stderr about something this run does besides scoring (a repair, a retry)."""
    print(f"precompute: {message}", file=sys.stderr, flush=True)


def _source(data: str) -> str:
    """--data as a comparable name: a local path made absolute and real (`in.jsonl` run from /w and
    `/w/in.jsonl` are one source), anything else (a URL, a hub or embedded name) as given."""
    path = data[len("file://"):] if data.startswith("file://") else data
    if "://" in path or not os.path.exists(path):
        return data
    return os.path.realpath(path)


def _check_source(cfg: PrecomputeConfig, markers: dict[int, dict | None]) -> None:
    """Refuse a second data set unless --append. The identity leaves the data out (a grown input
    adds its new rows), so without this check another --data would be added to the output silently."""
    sources = {m.get("source") or _source(m["data"]): m["data"] for m in markers.values() if m}
    if cfg.append or not sources or _source(cfg.data) in sources:
        return
    raise OutputMismatch(f"{cfg.output} holds pairs from {', '.join(sorted(set(sources.values())))}, not from "
                         f"{cfg.data}; pass --append to add this data set to it, --overwrite to replace it, "
                         "or choose another --output")


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


def _plan(cfg: PrecomputeConfig, first: int, redo: dict[str, int], known_keys: set[str],
          known_pairs: dict[str, str]) -> _Plan:
    """Rows whose key the output lacks: those of a repaired shard (`redo`: row key -> its index) go
    back into it, the others into new shards from index `first` on."""
    plan, layout, copies = _Plan(), None, Counter()
    seen = dict(known_pairs)
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
        k = redo.get(key)
        if k is None:
            k = first + new_rows // cfg.rows_per_shard
            new_rows += 1
        plan.rows_read[k] += 1
        try:
            if isinstance(raw, MalformedRow):
                raise RowRejected(getattr(raw, "reason", "malformed_json"), f"{raw.file} line {raw.line}: {raw.error}")
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


def _read_markers(cfg: PrecomputeConfig) -> dict[int, dict | None]:
    """`_progress/shard-k.json` by k; None for a marker that is not readable JSON."""
    markers: dict[int, dict | None] = {}
    for name in storage.list_names(storage.join(cfg.output, "_progress")):
        k = shard_index(name)
        if k is not None and name.endswith(".json"):
            try:
                markers[k] = storage.read_json(storage.join(cfg.output, "_progress", name))
            except ValueError:  # markers are written atomically: only a hand or a disk fault breaks one
                markers[k] = None
    return markers


def _remove_if_there(url: str) -> None:
    try:
        storage.remove(url)
    except FileNotFoundError:
        pass


def _verify(cfg: PrecomputeConfig, markers: dict[int, dict | None]) -> tuple[dict[int, dict], dict[str, int], list]:
    """Finished shards whose files match their marker, as manifest entries by index. Each other shard
    is removed, files first and marker last (a repair killed half-way is found and done again), and
    the row keys it covered are returned (key -> index) so that `_plan` puts its rows back into it."""
    done, redo, repaired = {}, {}, []
    for k in sorted(markers):
        entry = dict(markers[k] or {})
        keys = entry.pop("row_keys", None)
        problems = damaged_files(cfg.output, entry) if entry else [f"_progress/{shard_name(k)}.json: not readable"]
        if not problems:
            done[k] = entry
            continue
        _say(f"repairing {shard_name(k)} ({'; '.join(problems)}): scoring its "
             f"{entry.get('rows_read', 'unknown number of')} input rows again")
        for path in (entry.get("path"), entry.get("rejects_path"), f"_progress/{shard_name(k)}.json"):
            if path:
                _remove_if_there(storage.join(cfg.output, path))
        redo.update(dict.fromkeys(keys or (), k))
        repaired.append(shard_name(k))
    return done, redo, repaired


def _remove_unfinished(cfg: PrecomputeConfig, done: dict[int, dict]) -> None:
    """Shard and reject files a killed run left without a marker."""
    for folder in ("shards", "rejects"):
        for name in storage.list_names(storage.join(cfg.output, folder)):
            if shard_index(name) not in done:
                storage.remove(storage.join(cfg.output, folder, name))


def _parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=ROW_GROUP_SIZE, compression="zstd")
    return buf.getvalue()


def _write_shard(cfg: PrecomputeConfig, k: int, rows: list[dict], rejects: list[dict], rows_read: int) -> dict:
    rows = sorted(rows, key=lambda r: r["source_index"])
    rejects = sorted(rejects, key=lambda r: r["source_index"])
    table = pa.Table.from_pylist([{f: r[f] for f in SHARD_SCHEMA.names} for r in rows], schema=SHARD_SCHEMA)
    validate_table(table, SHARD_SCHEMA, shard_name(k))
    rej_data = _parquet_bytes(pa.Table.from_pylist(rejects, schema=REJECT_SCHEMA))
    data = _parquet_bytes(table)
    idx = [r["source_index"] for r in rows] + [r["source_index"] for r in rejects]
    storage.write_bytes_atomic(storage.join(cfg.output, "rejects", shard_name(k) + ".parquet"), rej_data)
    storage.write_bytes_atomic(storage.join(cfg.output, "shards", shard_name(k) + ".parquet"), data)
    entry = {"path": f"shards/{shard_name(k)}.parquet", "rows": table.num_rows, "bytes": len(data),
             "sha256": storage.sha256_bytes(data), "source_indices": [min(idx), max(idx)] if idx else None,
             "data": cfg.data, "source": _source(cfg.data), "rows_read": rows_read,
             "rejects_path": f"rejects/{shard_name(k)}.parquet", "rejects": len(rejects),
             "rejects_sha256": storage.sha256_bytes(rej_data),
             "rejects_by_reason": dict(Counter(r["reason"] for r in rejects)),
             "tokens": sum(pair_tokens(r) for r in rows),
             "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    # The marker also lists the shard's row keys, so that a damaged shard can be scored again into
    # the same index; the manifest leaves them out (they would make it grow with the data).
    keys = [r["row_key"] for r in rows] + [r["row_key"] for r in rejects]
    storage.write_json(storage.join(cfg.output, "_progress", shard_name(k) + ".json"), {**entry, "row_keys": keys},
                       indent=None)
    return entry


def gpu_shortage(gpus_per_worker: int, num_workers: int, node_gpus: list[float]) -> str | None:
    """Why `num_workers` scorers of `gpus_per_worker` GPUs each cannot all be placed on nodes with
    `node_gpus` GPUs (one scorer's GPUs are all on one node); None when they can."""
    k = gpus_per_worker
    room = sum(int(g // k) for g in node_gpus)
    if room >= num_workers:
        return None
    total = sum(node_gpus)
    has = (f"{total:g} GPUs, at most {max(node_gpus):g} on one node: room for {room}" if total
           else "no GPU (no CUDA device)")
    return (f"--gpus-per-worker {k} needs {k} GPUs of one node for each of the {num_workers} scorers "
            f"(--num-workers {num_workers}), with no CPU fallback; the Ray cluster has {has}")


def _check_gpus(cfg: PrecomputeConfig) -> None:
    """--gpus-per-worker above 1: fail at the start, before any work, where the cluster cannot hold
    the scorers (Ray would wait for ever, and the CPU is no place for a model that needs K GPUs)."""
    if cfg.gpus_per_worker == 1:
        return
    import ray

    init_ray(cfg.num_workers + 1)
    nodes = [n.get("Resources", {}).get("GPU", 0) for n in ray.nodes() if n.get("Alive")]
    problem = gpu_shortage(cfg.gpus_per_worker, cfg.num_workers, nodes)
    if problem:
        raise NotEnoughGpus(problem)


def _dataset(cfg: PrecomputeConfig, model_path: str, records: list[dict], progress):
    """The Ray Data pipeline over `records`: tokenize (tasks), then score (an actor pool)."""
    import ray
    import ray.data

    gpus = ray.cluster_resources().get("GPU", 0)
    # One GPU per scorer where the cluster has any; K GPUs per scorer (checked by `_check_gpus`) for K > 1.
    use_gpu = gpus >= cfg.gpus_per_worker if cfg.gpus_per_worker > 1 else gpus > 0
    # Small blocks keep every actor busy and the progress bar moving; shards complete as they arrive.
    blocks = min(len(records), max(2 * cfg.num_workers, -(-len(records) // max(cfg.batch_size, 8))))
    ds = ray.data.from_items(records, override_num_blocks=blocks)
    # batch_size=None: one call per block, so blocks are not merged and every actor gets work.
    ds = ds.map_batches(tokenize_batch, batch_format="pyarrow", batch_size=None, num_cpus=0.5,
                        fn_kwargs=dict(model_path=model_path, max_length=cfg.max_length,
                                       max_prompt_length=cfg.max_prompt_length, truncation_mode=cfg.truncation_mode))
    scorer_args = dict(model_path=model_path, dtype=cfg.dtype, max_length=cfg.max_length,
                       truncation_mode=cfg.truncation_mode, pack_prompts=cfg.pack_prompts, progress=progress,
                       threads=None if use_gpu else threads_per_worker(cfg.num_workers), gpus=cfg.gpus_per_worker)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ray_remote_args.* is deprecated")
        return ds.map_batches(ReferenceScorer, batch_format="pyarrow", batch_size=cfg.batch_size,
                              compute=ray.data.ActorPoolStrategy(size=cfg.num_workers),
                              num_gpus=cfg.gpus_per_worker if use_gpu else 0,
                              num_cpus=1, fn_constructor_kwargs=scorer_args, **_without_restarts(ds))


def _without_restarts(ds) -> dict:
    """max_restarts=0 for the scorer pool. Ray Data's default (restart a dead actor, retry its calls)
    makes Ray log an error-level line on every run (ray-project/ray#57733: the pool's constructor
    arguments live in the object store) and retries without end a batch that kills its process each
    time. Without restarts a pool that loses a process fails, and `_Run` starts a new one for the
    shards not yet finished. Ray Data takes the setting only among its free-form remote arguments,
    deprecated since Ray 2.60 (the warning is silenced in `_dataset`): where they are gone, nothing."""
    params = inspect.signature(ds.map_batches).parameters.values()
    return {"max_restarts": 0} if any(p.kind is p.VAR_KEYWORD for p in params) else {}


@contextmanager
def _polling(counter, on_progress):
    """While the block runs, pass the scorers' count of pairs done (`PairProgress.total`) to
    on_progress every POLL_SECONDS: a scorer call takes minutes on a real model, a forward seconds."""
    import ray

    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(POLL_SECONDS):
            try:
                on_progress(ray.get(counter.total.remote(), timeout=2))
            except Exception:  # noqa: BLE001 - a late or lost answer only leaves the bar where it is
                pass

    thread = threading.Thread(target=poll, name="precompute-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _score(cfg: PrecomputeConfig, model_path: str, records: list[dict], expected: Counter, on_shard, on_batch,
           on_progress=None) -> None:
    """Score `records` with one pool of scorers; call on_shard(k, rows) as each shard completes,
    on_batch(rows) for each scorer call's rows and, with on_progress, on_progress(pairs done) as the
    scorers report their forwards. Raises _PoolLost when a scorer process dies."""
    import ray

    # Actors take one logical CPU each; one more for the read/tokenize tasks so they never starve
    # behind the scorers (Ray Data otherwise stalls on a 2-core machine).
    init_ray(cfg.num_workers + 1)
    quiet_ray_data()
    counter = ray.remote(num_cpus=0)(PairProgress).remote() if on_progress else None
    ds = _dataset(cfg, model_path, records, counter)
    # By row key: a row delivered twice can neither appear twice nor finish its shard early.
    pending: dict[int, dict[str, dict]] = defaultdict(dict)
    finished: set[int] = set()
    try:
        with _polling(counter, on_progress) if counter else nullcontext():
            for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                recs = batch.to_pylist()
                for r in recs:
                    k = r["shard"]
                    if k in finished:
                        continue
                    pending[k][r["row_key"]] = r
                    if len(pending[k]) == expected[k]:
                        finished.add(k)
                        on_shard(k, list(pending.pop(k).values()))
                on_batch(recs)
    except ray.exceptions.RayActorError as e:
        raise _PoolLost(str(e).splitlines()[0][:300]) from e
    finally:
        if counter is not None:
            ray.kill(counter)
    if pending:
        raise RuntimeError(f"shards {sorted(pending)} did not receive all their rows")


class _Run:
    """One invocation's scoring: the shards it finishes, its counts and its progress bar."""

    def __init__(self, cfg: PrecomputeConfig, model_path: str, plan: _Plan, done: dict[int, dict],
                 pair_ids: list[str], started: float):
        self.cfg, self.model_path, self.plan, self.done, self.started = cfg, model_path, plan, done, started
        self.pair_ids = pair_ids  # the manifest's fingerprint: old shards' ids plus each new shard's
        self.written = self.rejected = self.tokens = self.received = 0
        self.bar = None
        self.base = 0  # rows of shards finished before the current pool started: where its bar starts

    def on_shard(self, k: int, results: list[dict]) -> None:
        rows = [r for r in results if r["reject_reason"] is None]
        rejects = self.plan.rejects.pop(k, []) + [
            {"source_index": r["source_index"], "row_key": r["row_key"], "reason": r["reject_reason"],
             "detail": r["reject_detail"], "row": r["row_json"]} for r in results if r["reject_reason"] is not None]
        self.done[k] = _write_shard(self.cfg, k, rows, rejects, self.plan.rows_read[k])
        self.pair_ids.extend(r["pair_id"] for r in rows)
        self.written += len(rows)
        self.rejected += len(rejects)
        self.tokens += sum(pair_tokens(r) for r in rows)

    def on_batch(self, recs: list[dict]) -> None:
        self.received += len(recs)
        if self.bar is not None:
            elapsed = max(time.time() - self.started, 1e-9)
            self.bar.set_postfix_str(f"{self.received / elapsed:.1f} pairs/s, {self.tokens / elapsed:.0f} tok/s",
                                     refresh=False)
            self.on_progress(0)

    def on_progress(self, pairs_done: int) -> None:
        """Move the bar to the scorers' count, or to the rows received if that is further; drawn only
        when it moves, so a log file (a Ray job's) gets no frame per poll."""
        bar = self.bar
        n = max(bar.n, min(bar.total, self.base + max(pairs_done, self.received - self.base)))
        if n != bar.n:
            bar.n = n
            bar.refresh()

    def score(self) -> None:
        # Shards where every row was rejected before tokenizing need no scoring.
        for k in sorted(self.plan.rows_read):
            if self.plan.expected[k] == 0:
                self.on_shard(k, [])
        if not self.plan.records:
            return
        if self.cfg.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=len(self.plan.records), unit="pair", desc="reference log-probs", file=sys.stderr,
                            dynamic_ncols=True)
        try:
            self._score_with_new_pools()
        finally:
            if self.bar is not None:
                self.bar.close()

    def _score_with_new_pools(self) -> None:
        for attempt in range(1, SCORER_ATTEMPTS + 1):
            records = [r for r in self.plan.records if r["shard"] not in self.done]
            self.received = self.base = len(self.plan.records) - len(records)
            if self.bar is not None:
                self.bar.n = self.base  # rows of unfinished shards are scored again: the bar goes back
                self.bar.refresh()
            try:
                _score(self.cfg, self.model_path, records, self.plan.expected, self.on_shard, self.on_batch,
                       self.on_progress if self.bar is not None else None)
                return
            except _PoolLost as e:
                unfinished = len({r["shard"] for r in records if r["shard"] not in self.done})
                if attempt == SCORER_ATTEMPTS:
                    raise ScorerDied(f"a scorer process died {attempt} times, last: {e}; {len(self.done)} shards are "
                                     f"finished and kept, {unfinished} are not: re-run the same command to finish "
                                     "them") from None
                _say(f"a scorer process died ({e}); scoring the {unfinished} unfinished shards with new scorers")

    def last_run(self, repaired: list[str]) -> dict:
        return {"seconds": round(time.time() - self.started, 3), "data": self.cfg.data,
                "pairs_written": self.written, "rows_rejected": self.rejected,
                "pairs_scored": self.written,  # the name older readers know: pairs the model scored and kept
                "tokens_scored": self.tokens, "new_shards": len(self.plan.rows_read), "shards_repaired": repaired,
                "rows_already_done": self.plan.already_done}


def run(cfg: PrecomputeConfig) -> dict:
    """Run the stage; returns the manifest."""
    started = time.time()
    _check_gpus(cfg)
    storage.configure(cfg.storage_options_dict)
    model_path = resolve_model(cfg.model)
    tokenizer = load_tokenizer(model_path)
    identity = _identity(cfg, model_path, tokenizer_hashes(tokenizer), weights_hash(model_path))
    _check_output(cfg, identity)
    markers = _read_markers(cfg)
    _check_source(cfg, markers)
    storage.write_json(storage.join(cfg.output, "_progress", "run.json"), identity)
    storage.write_bytes_atomic(storage.join(cfg.output, "config.yaml"), to_yaml(cfg).encode())

    for folder in ("shards", "rejects", "_progress"):
        storage.remove_partials(storage.join(cfg.output, folder))
    done, redo, repaired = _verify(cfg, markers)
    _remove_unfinished(cfg, done)
    known_keys, known_pairs = _known(cfg, done)
    # New shards come after every index a marker named, repaired ones included: those keep theirs.
    plan = _plan(cfg, max(markers, default=-1) + 1, redo, known_keys, known_pairs)
    job = _Run(cfg, model_path, plan, done, list(known_pairs), started)
    job.score()
    manifest = _manifest(cfg, model_path, identity, done, job.pair_ids, job.last_run(repaired))
    _check_written(cfg, manifest)
    return manifest


def _check_written(cfg: PrecomputeConfig, manifest: dict) -> None:
    """Fail a run after which the output holds no pair, once its rejects and manifest are written
    (`inspect` shows them). A re-run that adds nothing to an output with pairs is a success."""
    if manifest["rows_written"]:
        return
    if not manifest["rows_read"]:
        raise NothingWritten(f"{cfg.output} holds no pairs: {cfg.data} has no input rows")
    reasons = ", ".join(f"{k}: {v}" for k, v in manifest["rejects_by_reason"].items())
    raise NothingWritten(f"{cfg.output} holds no pairs: all {manifest['rows_read']} input rows were rejected "
                         f"({reasons}); see `pipeline.py inspect {cfg.output}` and {cfg.output}/rejects/")


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
    repaired = f", {len(run['shards_repaired'])} of them repaired" if run.get("shards_repaired") else ""
    lines = [
        f"precompute: {output}",
        f"  rows read {manifest['rows_read']}, written {manifest['rows_written']}, rejected {manifest['rows_rejected']}"
        + (f" ({', '.join(f'{k}: {v}' for k, v in manifest['rejects_by_reason'].items())})"
           if manifest['rejects_by_reason'] else ""),
        f"  {len(manifest['shards'])} shards, {manifest['tokens']} tokens, model {manifest['reference_model']['name']}"
        f" ({manifest['dtype']})",
        f"  {run['pairs_written']} pairs written, {run['rows_rejected']} rejected this run "
        f"({run['new_shards']} shards written{repaired}; {run['rows_already_done']} rows already done), "
        f"{secs:.1f}s ({run['pairs_written'] / secs:.2f} pairs/s, {run['tokens_scored'] / secs:.0f} tokens/s)",
    ]
    return "\n".join(lines)
