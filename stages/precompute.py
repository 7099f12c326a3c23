"""Precompute stage, a Ray pipeline end to end: the driver holds no rows.

    count (tasks) -> read, normalise, hash (Ray Data tasks) -> shuffle by content hash: row keys,
    rows already done -> shuffle by pair id: duplicates -> sort: shards -> tokenize (tasks)
    -> score (actor pool) -> deliver (tasks) -> shard writers (actors) -> manifest (driver)

(`row_plan` has the steps up to the shards, `shard_writer` the last ones.) The driver lists the
input files, reads the first row (for the layout), sums one count per file and per block, collects
one manifest entry per shard, and draws the progress bar; every row goes from task to task.

Every input row has a `row_key`: the hash of its raw content plus its occurrence number (the k-th
copy of the same row). A run skips rows whose key is already in the output (written or rejected),
and groups the remaining rows, in input order, into new shards of `rows_per_shard` input rows. So
re-running the same command after a crash finishes the job, re-running it after the input grew
scores only the new rows, and nothing is scored twice or lost.

Per shard a writer writes, in order, `_progress/shard-k.keys.parquet` (its row keys),
`rejects/shard-k.parquet`, `shards/shard-k.parquet` and `_progress/shard-k.json`; the last, the
marker, marks the shard finished and holds its manifest entry. Shard and rejects files without a
marker are removed at the next start. `manifest.json`, covering all finished shards, is written last.

Every run first checks each finished shard's files against its marker: a shard whose files are
missing or damaged is no longer finished. Its files and marker are removed (one line on stderr says
so) and its input rows, found by the row keys of its keys file, are scored again into a shard of the
same index k; so are the rows of a shard a killed run left with a keys file and no marker. A shard of
an older output whose marker held no row keys leaves no keys behind: its rows are then new work and
go into new shards after the last one. Either way every input row ends up in the output exactly once.

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

import json
import sys
import threading
import time
from contextlib import contextmanager, nullcontext

import pyarrow.parquet as pq

from stages.core import storage
from stages.core.config.engine import ConfigError, to_yaml
from stages.core.config.options import PrecomputeConfig
from stages.core.errors import PipelineError, unwrap
from stages.core.inputs.formats import Columns, detect
from stages.core.inputs.readers import MalformedRow, check_columns, embedded_layout, read_rows, resolve_source
from stages.core.inputs.unpaired import is_unpaired
from stages.core.lease import Lease
from stages.core.refs import output
from stages.core.refs.identity import OutputMismatch  # noqa: F401  (raised by refs.output: the command's error)
from stages.core.refs.manifest import Manifest, ShardEntry
from stages.core.refs.plan import Plan, Source, build_plan, content_hash, pair_id, pair_kl  # noqa: F401
from stages.core.refs.writer import (
    ShardWriter,
    deliver,
    pair_ids_sum,
)
from stages.core.runtime.cluster import actor_pool_map, init_ray, quiet_ray_data
from stages.core.runtime.devices import ray_use_gpu, threads_per_worker
from stages.core.runtime.models import for_workers, load_tokenizer, resolve_model, tokenizer_hashes, weights_hash
from stages.core.scoring.scorer import PairProgress, ReferenceScorer, tokenize_batch
from stages.core.scoring.truncation import Truncation

SCORER_ATTEMPTS = 3   # scorer pools one run starts: a pool fails as a whole when one of its processes dies
POLL_SECONDS = 0.5    # how often the progress bar asks the scorers how far they are


class NothingWritten(PipelineError):
    """The run ended with no usable pair in the output: empty input, or every row rejected."""


class ScorerDied(PipelineError):
    """Scorer processes kept dying; the finished shards are kept and a re-run scores the rest."""


class NotEnoughGpus(PipelineError):
    """--gpus-per-worker K above 1 on a Ray cluster without a node with K GPUs for each scorer."""


class _PoolLost(Exception):
    """A scorer process of this pool died (internal: the run retries with a new pool)."""


def _say(message: str) -> None:
    """A line on stderr about something this run does besides scoring (a repair, a retry)."""
    print(f"precompute: {message}", file=sys.stderr, flush=True)


def _layout(cfg: PrecomputeConfig) -> str:
    """The input layout, from the first row that parses (read here: one row, not the data set)."""
    if cfg.format != "auto":
        layout = cfg.format
    for _, raw in read_rows(cfg.data, cfg.split, cfg.limit):
        if not isinstance(raw, MalformedRow):
            if cfg.format == "auto":
                layout = embedded_layout(cfg.data) or ("unpaired" if is_unpaired(raw, Columns.of(cfg)) else detect(raw))
            check_columns(raw, layout, Columns.of(cfg))
            return layout
    return "standard" if cfg.format == "auto" else cfg.format  # no row parses: every one is a reject


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


def _use_gpu(cfg: PrecomputeConfig) -> bool:
    """Whether the scorers get GPUs (`--device`). With
    --gpus-per-worker above 1 and --device auto, fail at once where the cluster cannot hold the
    scorers (Ray would wait for ever, and the CPU is no place for a model that needs K GPUs)."""
    import ray

    init_ray(cfg.num_workers + 1)
    if cfg.gpus_per_worker > 1 and cfg.device == "auto":
        nodes = [n.get("Resources", {}).get("GPU", 0) for n in ray.nodes() if n.get("Alive")]
        problem = gpu_shortage(cfg.gpus_per_worker, cfg.num_workers, nodes)
        if problem:
            raise NotEnoughGpus(problem)
    return ray_use_gpu(cfg.device, f"{cfg.num_workers} reference scorer(s)", cfg.num_workers, cfg.gpus_per_worker,
                       cfg.gpu_wait_seconds, need_all=False)


def _dataset(cfg: PrecomputeConfig, model_path: str, plan: Plan, progress, writers: list, use_gpu: bool):
    """Ray Data over the plan's chunks: tokenize (tasks), score (an actor pool), hand to the writers (tasks)."""
    import ray
    import ray.data

    ds = ray.data.from_arrow_refs(plan.chunks)
    model_path = for_workers(cfg.model, model_path)  # resolved again by each task and actor, on its node
    truncation = Truncation(cfg.max_length, cfg.max_prompt_length, cfg.truncation_mode)
    apart = _tokenize_apart(use_gpu)
    if apart:
        # Tokenizing in CPU tasks keeps the GPUs fed. batch_size=None: one call per chunk, so chunks
        # are not merged and every actor gets work.
        ds = ds.map_batches(tokenize_batch, batch_format="pyarrow", batch_size=None, num_cpus=0.5,
                            fn_kwargs=dict(model_path=model_path, truncation=truncation))
    scorer_args = dict(model_path=model_path, dtype=cfg.dtype, truncation=truncation,
                       pack_prompts=cfg.pack_prompts, progress=progress,
                       threads=None if use_gpu else threads_per_worker(cfg.num_workers), gpus=cfg.gpus_per_worker,
                       # Scoring on CPU, a tokenize task would take the cores the scorers score on; the
                       # scorer tokenizes its own batch instead, and its rows skip a trip through Ray.
                       tokenize=not apart, device="cuda" if use_gpu else "cpu")
    ds = actor_pool_map(ds, ReferenceScorer, batch_size=cfg.batch_size, size=cfg.num_workers,
                        num_gpus=cfg.gpus_per_worker if use_gpu else 0, num_cpus=1, fn_constructor_kwargs=scorer_args)
    return ds.map_batches(deliver, batch_format="pyarrow", batch_size=None, num_cpus=0.1,
                          fn_kwargs=dict(writers=writers))


def _tokenize_apart(use_gpu: bool) -> bool:
    """Tokenize in tasks of their own (GPU scorers), or in the scorer's call (CPU scorers: measured in
    bench/precompute_scale.py, tasks beside CPU scorers only take their cores; BENCHMARKS.md)."""
    return use_gpu


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


def _score(cfg: PrecomputeConfig, model_path: str, plan: Plan, use_gpu: bool, on_batch,
           on_progress=None) -> list[dict]:
    """Score the plan's rows with one pool of scorers, their shards written by writer actors; returns the
    entries of the shards written. Calls on_batch(rows, pairs, tokens, entries) per scored batch and, with
    on_progress, on_progress(pairs done) as the scorers report their forwards. Raises _PoolLost when a
    scorer (or writer) process dies."""
    import ray

    counter = ray.remote(num_cpus=0)(PairProgress).remote() if on_progress else None
    writer = ray.remote(num_cpus=0, max_restarts=0)(ShardWriter)
    writers = [writer.remote(cfg.output, plan.rows_read, cfg.data, output.source_name(cfg.data),
                             cfg.storage_options_dict, plan.unpaired)
               for _ in range(max(1, min(cfg.num_workers, len(plan.rows_read))))]
    entries: list[ShardEntry] = []
    try:
        with _polling(counter, on_progress) if counter else nullcontext():
            for batch in _dataset(cfg, model_path, plan, counter, writers, use_gpu).iter_batches(batch_size=None,
                                                                                       batch_format="pyarrow"):
                for row in batch.to_pylist():
                    new = [ShardEntry.from_json(e) for e in json.loads(row["entries"])]
                    entries += new
                    on_batch(row["rows"], row["pairs"], row["tokens"], new)
    except ray.exceptions.RayActorError as e:
        raise _PoolLost(str(e).splitlines()[0][:300]) from e
    finally:
        for actor in writers + ([counter] if counter is not None else []):
            ray.kill(actor)
    missing = set(plan.rows_read) - {output.entry_index(e) for e in entries}
    if missing:
        raise RuntimeError(f"shards {sorted(missing)} did not receive all their rows")
    return entries


class _Run:
    """One invocation: its attempts (a new scorer pool each), the shards it writes, its counts and bar."""

    def __init__(self, cfg: PrecomputeConfig, model_path: str, source: Source, layout: str, started: float,
                 use_gpu: bool):
        self.cfg, self.model_path, self.source, self.layout, self.started = cfg, model_path, source, layout, started
        self.use_gpu = use_gpu  # whether the scorers get GPUs (`_use_gpu`)
        self.entries: list[dict] = []  # shards written by this run
        self.repaired: list[str] = []
        self.already_done: int | None = None
        self.received = self.stream_tokens = 0
        self.bar = None
        self.unit = "example" if layout == "unpaired" or cfg.unpair else "pair"  # what the bar counts
        self.base = 0  # rows of shards finished before the current pool started: where its bar starts

    def _prepare(self) -> tuple[dict[int, dict], Plan]:
        """Clean up after a killed run, check the finished shards, and plan the rest."""
        cfg = self.cfg
        for folder in ("shards", "rejects", "_progress"):
            storage.remove_partials(storage.join(cfg.output, folder))
        markers = output.read_markers(cfg.output)
        done, repaired = output.verify(cfg.output, markers, _say)
        self.repaired += repaired
        output.remove_unfinished(cfg.output, done)
        keys = output.keys_files(cfg.output)
        # New shards come after every index a marker or keys file named: the others keep theirs.
        first = max(set(markers) | keys, default=-1) + 1
        init_ray(cfg.num_workers + 1)
        quiet_ray_data()
        plan = build_plan(cfg, self.source, self.layout, output.known_files(done, keys - set(done)), first)
        if (self.layout == "unpaired" or cfg.unpair) and plan.rows:
            plan = pair_kl(plan, cfg.kl_seed)  # each example's KL completion, from its own shard
        return done, plan

    def run(self) -> dict[int, dict]:
        try:
            return self._attempts()
        except Exception as e:
            error = unwrap(e)  # a task's DataError, a writer's full disk: raised as itself
            if error is None or error is e:
                raise
            raise error from None
        finally:
            if self.bar is not None:
                self.bar.close()

    def _attempts(self) -> dict[int, dict]:
        for attempt in range(1, SCORER_ATTEMPTS + 1):
            done, plan = self._prepare()
            if self.already_done is None:
                self.already_done = plan.already_done
                if self.cfg.progress and plan.rows:
                    from tqdm import tqdm

                    self.bar = tqdm(total=plan.rows, unit=self.unit, desc="reference log-probs", file=sys.stderr,
                                    dynamic_ncols=True)
            if not plan.rows:
                return done
            self.received = self.base = (self.bar.total - plan.rows) if self.bar is not None else 0
            if self.bar is not None:
                self.bar.n = self.base  # rows of unfinished shards are scored again: the bar goes back
                self.bar.refresh()
            try:
                entries = _score(self.cfg, self.model_path, plan, self.use_gpu, self.on_batch,
                                 self.on_progress if self.bar is not None else None)
                done.update({output.entry_index(e): e for e in entries})
                return done
            except _PoolLost as e:
                unfinished = len(set(plan.rows_read) - {output.entry_index(x) for x in self.entries})
                if attempt == SCORER_ATTEMPTS:
                    raise ScorerDied(f"a scorer process died {attempt} times, last: {e}; the finished shards are "
                                     f"kept, {unfinished} are not finished: re-run the same command to finish "
                                     "them") from None
                _say(f"a scorer process died ({e}); scoring the {unfinished} unfinished shards with new scorers")
        raise AssertionError("unreachable")

    def on_batch(self, rows: int, pairs: int, tokens: int, entries: list[dict]) -> None:
        self.entries += entries
        self.received += rows
        self.stream_tokens += tokens
        if self.bar is not None:
            elapsed = max(time.time() - self.started, 1e-9)
            self.bar.set_postfix_str(f"{self.received / elapsed:.1f} {self.unit}s/s, "
                                     f"{self.stream_tokens / elapsed:.0f} tok/s", refresh=False)
            self.on_progress(0)

    def on_progress(self, pairs_done: int) -> None:
        """Move the bar to the scorers' count, or to the rows received if that is further; drawn only
        when it moves, so a log file (a Ray job's) gets no frame per poll."""
        bar = self.bar
        n = max(bar.n, min(bar.total, self.base + max(pairs_done, self.received - self.base)))
        if n != bar.n:
            bar.n = n
            bar.refresh()

    def last_run(self) -> dict:
        written = sum(e.rows for e in self.entries)
        return {"seconds": round(time.time() - self.started, 3), "data": self.cfg.data,
                "pairs_written": written, "rows_rejected": sum(e.rejects for e in self.entries),
                "pairs_scored": written,  # the name older readers know: pairs the model scored and kept
                "tokens_scored": sum(e.tokens for e in self.entries), "new_shards": len(self.entries),
                "shards_repaired": self.repaired, "rows_already_done": self.already_done or 0}


def run(cfg: PrecomputeConfig) -> Manifest:
    """Run the stage; returns the manifest."""
    started = time.time()
    if cfg.gpus_per_worker > 1 and cfg.device == "cpu":
        raise NotEnoughGpus(f"--gpus-per-worker {cfg.gpus_per_worker} spreads the reference over GPUs: it needs "
                            "--device cuda or auto, not cpu")
    storage.configure(cfg.storage_options_dict)
    model_path = resolve_model(cfg.model)
    tokenizer = load_tokenizer(model_path)
    identity = output.identity(cfg, tokenizer_hashes(tokenizer), weights_hash(model_path))
    use_gpu = _use_gpu(cfg)  # before anything is written: a cluster without the GPUs asked for fails here
    with Lease(cfg.output, "precompute") as lease:  # one run at a time writes an output
        output.check_output(cfg, identity)
        output.check_source(cfg, output.read_markers(cfg.output))
        layout = _layout(cfg)
        if cfg.unpair and layout == "unpaired":
            raise ConfigError(f"--unpair turns pairs into unpaired examples, and {cfg.data} is already unpaired")
        identity = output.with_kind(cfg, identity, "unpaired" if cfg.unpair else layout)
        output.write_identity(cfg.output, identity)
        storage.write_bytes_atomic(storage.join(cfg.output, "config.yaml"), to_yaml(cfg).encode())
        job = _Run(cfg, model_path, Source.of(cfg.data, cfg.split, cfg.storage_options_dict or None), layout,
                   started, use_gpu)
        done = job.run()
        lease.check()  # a run that lost its lease while it stalled leaves the manifest to the new holder
        manifest = _manifest(cfg, model_path, identity, done, job.last_run())
    _check_written(cfg, manifest)
    return manifest


def _check_written(cfg: PrecomputeConfig, manifest: Manifest) -> None:
    """Fail a run after which the output holds no pair, once its rejects and manifest are written
    (`inspect` shows them). A re-run that adds nothing to an output with pairs is a success."""
    if manifest.rows_written:
        return
    what = _unit(manifest)
    if not manifest.rows_read:
        raise NothingWritten(f"{cfg.output} holds no {what}: {cfg.data} has no input rows")
    reasons = ", ".join(f"{k}: {v}" for k, v in manifest.rejects_by_reason.items())
    raise NothingWritten(f"{cfg.output} holds no {what}: all {manifest.rows_read} input rows were rejected "
                         f"({reasons}); see `pipeline.py inspect {cfg.output}` and {cfg.output}/rejects/")


def _pair_ids_sums(cfg: PrecomputeConfig, done: dict[int, ShardEntry]) -> list[int]:
    """Each shard's `pair_ids_sum`; shards of older outputs lack it, and a Ray task reads their pair ids."""
    import ray

    def shard_sum(path: str, options: dict) -> int:
        storage.configure(options)
        with storage.open_binary(storage.join(cfg.output, path)) as fh:
            return pair_ids_sum(pq.read_table(fh, columns=["pair_id"]).column("pair_id").to_pylist())

    older = [e.path for e in done.values() if e.pair_ids_sum is None]
    if older:
        init_ray(1)
    sums = ray.get([ray.remote(num_cpus=0.25)(shard_sum).remote(p, cfg.storage_options_dict) for p in older])
    return [int(e.pair_ids_sum, 16) for e in done.values() if e.pair_ids_sum is not None] + sums


def _manifest(cfg: PrecomputeConfig, model_path: str, identity: dict, done: dict[int, ShardEntry],
              last_run: dict) -> Manifest:
    """manifest.json over the finished shards, written last."""
    manifest = output.build_manifest(cfg, model_path, identity, [done[k] for k in sorted(done)],
                                     _pair_ids_sums(cfg, done), last_run,
                                     _input_rows(cfg, done) if cfg.unpair else None, resolve_source(cfg.data))
    manifest.write(storage.join(cfg.output, "manifest.json"))
    return manifest


def _input_rows(cfg: PrecomputeConfig, done: dict[int, ShardEntry]) -> int:
    """--unpair: the input rows behind the output's shards. Input row i became examples 2i and 2i + 1,
    or one reject 2i (no usable pair); a half rejected later keeps its index. So every row left exactly
    one even source index in a shard or its rejects: a Ray task per file counts them."""
    import pyarrow.compute as pc
    import ray

    def evens(path: str, options: dict) -> int:
        storage.configure(options)
        with storage.open_binary(storage.join(cfg.output, path)) as fh:
            index = pq.read_table(fh, columns=["source_index"]).column("source_index")
        return int(pc.sum(pc.equal(pc.bit_wise_and(index, 1), 0)).as_py() or 0)

    paths = [p for e in done.values() for p in (e.path, e.rejects_path) if p]
    if paths:
        init_ray(1)
    return sum(ray.get([ray.remote(num_cpus=0.25)(evens).remote(p, cfg.storage_options_dict) for p in paths]))


def _unit(manifest: Manifest) -> str:
    return "examples" if manifest.kind == "unpaired" else "pairs"


def _rows_read(manifest: Manifest) -> str:
    """The input rows read; with --unpair also what they made (rows_read = examples + rows rejected whole)."""
    inputs = manifest.input_rows
    if not manifest.unpaired_input:
        return f"rows read {inputs}"
    whole = 2 * inputs - manifest.rows_read  # each usable pair made two examples, an unusable row one reject
    made = f"{manifest.rows_read - whole} examples" + (f", {whole} row{'s' * (whole != 1)} rejected whole"
                                                       if whole else "")
    return f"rows read {inputs} (--unpair: {made})"


def summary(manifest: Manifest, output: str) -> str:
    run = manifest.last_run
    secs = run.seconds or 1e-9
    unit = _unit(manifest)
    done = "rows" if unit == "pairs" else unit
    repaired = f", {len(run.shards_repaired)} of them repaired" if run.shards_repaired else ""
    reasons = manifest.rejects_by_reason
    lines = [
        f"precompute: {output}",
        f"  {_rows_read(manifest)}, written {manifest.rows_written}, rejected {manifest.rows_rejected}"
        + (f" ({', '.join(f'{k}: {v}' for k, v in reasons.items())})" if reasons else ""),
        f"  {len(manifest.shards)} shards, {manifest.tokens} tokens, model {manifest.reference_model.name}"
        f" ({manifest.dtype})",
        f"  {run.pairs_written} {unit} written, {run.rows_rejected} rejected this run "
        f"({run.new_shards} shards written{repaired}; {run.rows_already_done} {done} already done), "
        f"{secs:.1f}s ({run.pairs_written / secs:.2f} {unit}/s, {run.tokens_scored / secs:.0f} tokens/s)",
    ]
    return "\n".join(lines)
