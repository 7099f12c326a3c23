"""Precompute stage, a Ray pipeline end to end: the driver holds no rows.

    count (tasks) -> read, normalise, hash (Ray Data tasks) -> shuffle by content hash: row keys,
    rows already done -> shuffle by pair id: duplicates -> sort: shards -> tokenize (tasks)
    -> score (actor pool) -> deliver (tasks) -> shard writers (actors) -> manifest (driver)

(`refs.plan` has the steps up to the shards, `refs.scoring_run` the scorer pools and their retries,
`refs.writer` the last steps; this command holds the lease, the output's identity and the manifest.)
The driver lists the input files, reads the first row (for the layout), sums one count per file and
per block, collects one manifest entry per shard, and draws the progress bar; every row goes from
task to task.

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
missing or damaged is no longer finished. Its files and marker are removed (a `precompute: repairing`
line on the console channel, stderr, says so) and its input rows, found by the row keys of its keys
file, are scored again into a shard of the same index k; so are the rows of a shard a killed run
left with a keys file and no marker. A shard of an older output whose marker held no row keys leaves
no keys behind: its rows are then new work and go into new shards after the last one. Either way
every input row ends up in the output exactly once.

The settings that decide how a row is scored must match the output's (`_progress/run.json`); the
data is not one of them, so that a re-run over grown input adds the new rows. A different data set
(another --data than the ones the output's shards came from) is refused unless --append.

A scorer process that dies (the OOM killer, a kill by hand) fails its Ray pool at once (the pool
runs without Ray's actor restarts); the run keeps the shards it finished, starts a new pool for
the rest (a `precompute: a scorer process died` line says so), and gives up after SCORER_ATTEMPTS
pools (refs.scoring_run) with one line: re-running then finishes the job.

A run after which the output holds no pair at all (empty input, every row rejected) fails with one
line giving the reject counts, after writing the rejects and manifest so that `inspect` can show them.
"""

from __future__ import annotations

import time

import pyarrow.parquet as pq

from stages.core import storage
from stages.core.config.engine import ConfigError, to_yaml
from stages.core.config.options import PrecomputeConfig
from stages.core.errors import PipelineError
from stages.core.inputs.files import MalformedRow
from stages.core.inputs.folders import embedded_layout, resolve_source
from stages.core.inputs.formats import Columns, detect
from stages.core.inputs.readers import check_columns, read_rows
from stages.core.inputs.unpaired import is_unpaired
from stages.core.lease import Lease
from stages.core.refs import output
from stages.core.refs.identity import OutputMismatch  # noqa: F401  (raised by refs.output: the command's error)
from stages.core.refs.manifest import Manifest, ShardEntry
from stages.core.refs.plan import Source
from stages.core.refs.scoring_run import NotEnoughGpus, ScoringRun, use_gpu
from stages.core.refs.writer import pair_ids_sum
from stages.core.runtime.cluster import init_ray
from stages.core.runtime.models import load_tokenizer, resolve_model, tokenizer_hashes, weights_hash


class NothingWritten(PipelineError):
    """The run ended with no usable pair in the output: empty input, or every row rejected."""


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
    gpus = use_gpu(cfg)  # before anything is written: a cluster without the GPUs asked for fails here
    with Lease(cfg.output, "precompute") as lease:  # one run at a time writes an output
        output.check_output(cfg, identity)
        output.check_source(cfg, output.read_markers(cfg.output))
        layout = _layout(cfg)
        if cfg.unpair and layout == "unpaired":
            raise ConfigError(f"--unpair turns pairs into unpaired examples, and {cfg.data} is already unpaired")
        identity = output.with_kind(cfg, identity, "unpaired" if cfg.unpair else layout)
        output.write_identity(cfg.output, identity)
        storage.write_bytes_atomic(storage.join(cfg.output, "config.yaml"), to_yaml(cfg).encode())
        job = ScoringRun(cfg, model_path, Source.of(cfg.data, cfg.split, cfg.storage_options_dict or None), layout,
                         started, gpus)
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
