"""Step 5 of precompute's plan: each new row's shard, from row counts per sorted block summed in the
driver (one number per block), and the rows cut into chunks for the tokenize tasks; `Plan`, what a run
scores.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

CHUNK_ROWS = 1024        # most rows per tokenize task


def block_counts(block: pa.Table) -> tuple[int, int, dict[int, int]]:
    """(rows, new rows (no shard yet), rows per shard being scored again) of one sorted block."""
    redo = Counter(k for k in block.column("shard").to_pylist() if k is not None)
    return len(block), len(block) - sum(redo.values()), dict(redo)


def assign(block: pa.Table, rank: int, first: int, rows_per_shard: int, chunk: int) -> list[pa.Table] | pa.Table:
    """Shards of one sorted block whose first new row has rank `rank`, cut into chunks of `chunk` rows, in
    the columns tokenize_batch takes: a reject keeps its raw text as `row_json`."""
    shards = block.column("shard").to_pylist()
    for i, k in enumerate(shards):
        if k is None:
            shards[i] = first + rank // rows_per_shard
            rank += 1
    rejected = pc.is_valid(block["reject_reason"])
    out = pa.table({"pair_id": block["pair_id"], "row_key": block["row_key"], "source_index": block["source_index"],
                    "shard": pa.array(shards, pa.int64()), "reject_reason": block["reject_reason"],
                    "reject_detail": block["reject_detail"],
                    "row_json": pc.if_else(rejected, block["raw"], block["row_json"])})
    parts = [out.slice(s, chunk) for s in range(0, len(out), chunk)] or [out]
    return parts if len(parts) > 1 else parts[0]


@dataclass
class Plan:
    """The rows one run scores: chunks (object refs) in source_index order, and their counts."""

    chunks: list            # ObjectRef[pa.Table]
    rows_read: dict[int, int]  # rows each shard of this run takes (rejects included)
    already_done: int
    rows: int               # rows this run sends through the pipeline
    unpaired: bool = False  # unpaired examples (KTO), their KL completions set (`pair_kl`)


def shard_rows(new_rows: int, first: int, rows_per_shard: int, redo: Counter) -> dict[int, int]:
    """Rows each shard of a run gets: the new rows fill shards from `first` in order."""
    counts = dict(redo)
    for s in range(0, new_rows, rows_per_shard):
        counts[first + s // rows_per_shard] = min(rows_per_shard, new_rows - s)
    return counts


def _chunk_rows(rows: int, workers: int) -> int:
    """Rows per tokenize task: enough tasks to keep every scorer fed, none above CHUNK_ROWS."""
    return max(1, min(CHUNK_ROWS, -(-rows // (4 * workers))))


def assign_shards(cfg, refs: list, first: int, already_done: int, rows: int) -> Plan:
    """Step 5 over the sorted blocks `refs`: their counts (one Ray task each), then `assign` per block from
    the rank of its first new row."""
    import ray

    counts = ray.get([ray.remote(num_cpus=0.25)(block_counts).remote(r) for r in refs])
    redo: Counter = Counter()
    for _, _, per_shard in counts:
        redo.update(per_shard)
    chunk = _chunk_rows(rows, cfg.num_workers)
    task = ray.remote(num_cpus=0.25)(assign)
    chunks, rank = [], 0
    for ref, (n, new, _) in zip(refs, counts):
        if not n:
            continue
        pieces = -(-n // chunk)
        out = task.options(num_returns=pieces).remote(ref, rank, first, cfg.rows_per_shard, chunk)
        chunks += out if pieces > 1 else [out]
        rank += new
    return Plan(chunks, shard_rows(rank, first, cfg.rows_per_shard, redo), already_done, rows)
