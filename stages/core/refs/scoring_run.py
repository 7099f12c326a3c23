"""Precompute's scoring: the plan's rows through a pool of Ray scorers into shards, with a new pool
when a scorer process dies, and the progress bar over all of it.

    tokenize (tasks, or in the scorer) -> score (an actor pool) -> deliver (tasks) -> shard writers (actors)

`ScoringRun` is one invocation of `pipeline.py precompute` past its checks: before each pool it cleans
up after a killed run, checks the finished shards (`output.verify` repairs a damaged one) and plans the
rest (`plan.build_plan`); then one pool scores the plan (`score`). A scorer process that dies (the OOM
killer, a kill by hand) fails its Ray pool at once (the pool runs without Ray's actor restarts); the run
keeps the shards it finished, starts a new pool for the rest, and gives up after SCORER_ATTEMPTS pools
with one line (`ScorerDied`): re-running then finishes the job.

`use_gpu` decides where the scorers run (`--device`, `--gpus-per-worker`) before anything is written.
The command (stages/precompute.py) holds the lease, the output's identity and the manifest.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from contextlib import closing, contextmanager, nullcontext

from stages.core import console, storage
from stages.core.config.options import PrecomputeConfig
from stages.core.errors import PipelineError, unwrap
from stages.core.lease import check_held
from stages.core.refs import output
from stages.core.refs.manifest import ShardEntry
from stages.core.refs.plan import Source, build_plan, pair_kl
from stages.core.refs.sharding import Plan
from stages.core.refs.writer import ShardWriter, deliver
from stages.core.runtime.cluster import actor_pool_map, init_ray, quiet_ray_data
from stages.core.runtime.devices import ray_use_gpu, threads_per_worker
from stages.core.runtime.models import for_workers
from stages.core.scoring.packing import PAIRS_PER_CALL
from stages.core.scoring.scorer import PairProgress, ReferenceScorer, tokenize_batch
from stages.core.scoring.truncation import Truncation

SCORER_ATTEMPTS = 3   # scorer pools one run starts: a pool fails as a whole when one of its processes dies
POLL_SECONDS = 0.5    # how often the progress bar asks the scorers how far they are

class ScorerDied(PipelineError):
    """Scorer processes kept dying; the finished shards are kept and a re-run scores the rest."""


class NotEnoughGpus(PipelineError):
    """--gpus-per-worker K above 1 on a Ray cluster without a node with K GPUs for each scorer."""


class _PoolLost(Exception):
    """A scorer process of this pool died (internal: the run retries with a new pool)."""


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


def use_gpu(cfg: PrecomputeConfig) -> bool:
    """Whether the scorers get GPUs (`--device`). With --gpus-per-worker above 1 and --device auto,
    fail at once where the cluster cannot hold the scorers (Ray would wait for ever, and the CPU is
    no place for a model that needs K GPUs)."""
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
                       pack_prompts=cfg.pack_prompts, attention=cfg.attention,
                       tokens_per_forward=cfg.tokens_per_forward, progress=progress,
                       threads=None if use_gpu else threads_per_worker(cfg.num_workers), gpus=cfg.gpus_per_worker,
                       # Scoring on CPU, a tokenize task would take the cores the scorers score on; the
                       # scorer tokenizes its own batch instead, and its rows skip a trip through Ray.
                       tokenize=not apart, device="cuda" if use_gpu else "cpu")
    per_call = cfg.batch_size or PAIRS_PER_CALL["cuda" if use_gpu else "cpu"]
    ds = actor_pool_map(ds, ReferenceScorer, batch_size=per_call, size=cfg.num_workers,
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


def score(cfg: PrecomputeConfig, model_path: str, plan: Plan, use_gpu: bool, on_batch,
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
        # Closed however the loop ends: a stage stopped mid-stream (a lost lease) must stop the dataset's
        # executor now, not leave its thread to touch Ray after the driver shuts it down (a hard exit, code 1).
        batches = _dataset(cfg, model_path, plan, counter, writers, use_gpu).iter_batches(batch_size=None,
                                                                                     batch_format="pyarrow")
        with _polling(counter, on_progress) if counter else nullcontext(), closing(iter(batches)) as stream:
            for batch in stream:
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


class ScoringRun:
    """One precompute invocation's scoring: its attempts (a new scorer pool each), the shards it writes,
    its counts (`last_run`, for the manifest) and its progress bar."""

    def __init__(self, cfg: PrecomputeConfig, model_path: str, source: Source, layout: str, started: float,
                 use_gpu: bool):
        self.cfg, self.model_path, self.source, self.layout, self.started = cfg, model_path, source, layout, started
        self.use_gpu = use_gpu  # whether the scorers get GPUs (`use_gpu`)
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
        done, repaired = output.verify(cfg.output, markers)
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
                entries = score(self.cfg, self.model_path, plan, self.use_gpu, self.on_batch,
                                 self.on_progress if self.bar is not None else None)
                done.update({output.entry_index(e): e for e in entries})
                return done
            except _PoolLost as e:
                unfinished = len(set(plan.rows_read) - {output.entry_index(x) for x in self.entries})
                if attempt == SCORER_ATTEMPTS:
                    raise ScorerDied(f"a scorer process died {attempt} times, last: {e}; the finished shards are "
                                     f"kept, {unfinished} are not finished: re-run the same command to finish "
                                     "them") from None
                console.say("precompute", f"a scorer process died ({e}); scoring the {unfinished} unfinished shards "
                            "with new scorers")
        raise AssertionError("unreachable")

    def on_batch(self, rows: int, pairs: int, tokens: int, entries: list[dict]) -> None:
        check_held()  # a run that lost its output's lease stops at the next scored batch
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

