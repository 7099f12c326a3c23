"""The last steps of precompute, on the cluster: scored rows -> shard files, written by writer actors.

The scorers finish batches in any order, and a shard's rows arrive in several of them, so the rows of
one shard have to meet somewhere: in a `ShardWriter` actor (shard k goes to writer k mod W). A writer
keeps a shard's rows until it has all `rows_read` of them, then writes, in order:
`_progress/shard-k.keys.parquet` (the shard's row keys, so a shard found damaged later, or left
unfinished by a killed run, is scored again into the same index), `rejects/shard-k.parquet`,
`shards/shard-k.parquet` and `_progress/shard-k.json`, the marker that makes the shard finished and
holds its manifest entry. Every file is written atomically (a file appears only complete).

`deliver`, a Ray Data step after the scorer pool, hands each scored batch to the writers and passes on
one small row per batch (pairs, tokens, finished shards' entries): all the driver ever sees.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections import Counter
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from schemas import REJECT_SCHEMA, SHARD_SCHEMA, UNPAIRED_SHARD_SCHEMA, validate_table
from stages.core import storage

ROW_GROUP_SIZE = 256  # rows per Parquet row group: the trainer's unit of streaming
FINGERPRINT_MOD = 1 << 256


def shard_name(k: int) -> str:
    return f"shard-{k:05d}"


def shard_index(file_name: str) -> int | None:
    """'shard-00012.parquet', 'shard-00012.json' or 'shard-00012.keys.parquet' -> 12; None for any other name."""
    prefix, _, rest = file_name.partition("-")
    number = rest.split(".", 1)[0]
    return int(number) if prefix == "shard" and number.isdigit() else None


def keys_path(k: int) -> str:
    return f"_progress/{shard_name(k)}.keys.parquet"


def pair_ids_sum(ids) -> int:
    """Sum of the pair ids' sha256 values mod 2**256: per shard, so that the manifest's fingerprint of the
    whole set (`fingerprint`) needs no list of every id and does not depend on how pairs fell into shards."""
    return sum(int(hashlib.sha256(p.encode()).hexdigest(), 16) for p in ids) % FINGERPRINT_MOD


def fingerprint(sums) -> str:
    return f"{sum(sums) % FINGERPRINT_MOD:064x}"


def pair_tokens(r: dict) -> int:
    """Tokens a plain scorer runs for a pair: the prompt once per answer."""
    return len(r["prompt_ids"]) * 2 + len(r["chosen_ids"]) + len(r["rejected_ids"])


def unpaired_row(r: dict) -> dict:
    """A scored unpaired example (the scorer saw it as a pair: completion as chosen, the KL completion as
    rejected) in the columns of UNPAIRED_SHARD_SCHEMA."""
    kl = bool(r["kl"])
    return {"example_id": r["pair_id"], "source_index": r["source_index"], "row_key": r["row_key"],
            "prompt_ids": r["prompt_ids"], "completion_ids": r["chosen_ids"], "label": r["label"],
            "ref_logps": r["ref_chosen_logps"], "completion_scored_tokens": r["chosen_scored_tokens"],
            "kl_completion_ids": r["rejected_ids"] if kl else [],
            "ref_kl_logps": r["ref_rejected_logps"] if kl else None,
            "kl_scored_tokens": r["rejected_scored_tokens"] if kl else 0}


def parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=ROW_GROUP_SIZE, compression="zstd")
    return buf.getvalue()


def write_shard(output: str, k: int, results: list[dict], rows_read: int, data: str, source: str,
                unpaired: bool = False) -> dict:
    """Write shard k from its scored rows (rejects carry their reason); returns its manifest entry.
    `unpaired`: the rows are KTO examples (UNPAIRED_SHARD_SCHEMA), even in a shard of rejects only."""
    results = sorted(results, key=lambda r: r["source_index"])
    rows = [r for r in results if r["reject_reason"] is None]
    rejects = [{"source_index": r["source_index"], "row_key": r["row_key"], "reason": r["reject_reason"],
                "detail": r["reject_detail"], "row": r["row_json"]} for r in results if r["reject_reason"] is not None]
    schema = UNPAIRED_SHARD_SCHEMA if unpaired else SHARD_SCHEMA
    table = pa.Table.from_pylist([unpaired_row(r) if unpaired else {f: r[f] for f in SHARD_SCHEMA.names}
                                  for r in rows], schema=schema)
    validate_table(table, schema, shard_name(k))
    rej_data = parquet_bytes(pa.Table.from_pylist(rejects, schema=REJECT_SCHEMA))
    shard_data = parquet_bytes(table)
    keys = pa.table({"row_key": pa.array([r["row_key"] for r in results], pa.string())})
    storage.write_bytes_atomic(storage.join(output, keys_path(k)), parquet_bytes(keys))
    storage.write_bytes_atomic(storage.join(output, "rejects", shard_name(k) + ".parquet"), rej_data)
    storage.write_bytes_atomic(storage.join(output, "shards", shard_name(k) + ".parquet"), shard_data)
    idx = [r["source_index"] for r in results]
    entry = {"path": f"shards/{shard_name(k)}.parquet", "rows": table.num_rows, "bytes": len(shard_data),
             "sha256": storage.sha256_bytes(shard_data), "source_indices": [idx[0], idx[-1]] if idx else None,
             "data": data, "source": source, "rows_read": rows_read,
             "rejects_path": f"rejects/{shard_name(k)}.parquet", "rejects": len(rejects),
             "rejects_sha256": storage.sha256_bytes(rej_data), "rejects_bytes": len(rej_data),
             "rejects_by_reason": dict(Counter(r["reason"] for r in rejects)),
             "tokens": sum(pair_tokens(r) for r in rows), "keys_path": keys_path(k),
             "pair_ids_sum": f"{pair_ids_sum(r['pair_id'] for r in rows):064x}",
             "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    storage.write_json(storage.join(output, "_progress", shard_name(k) + ".json"), entry, indent=None)
    return entry


class ShardWriter:
    """A Ray actor that gathers the rows of its shards and writes each shard once it has all of them.

    `rows_read`: shard index -> rows it takes this run (its own shards among them). Rows are kept by row
    key: a row delivered twice (a retried task) can neither appear twice nor finish its shard early."""

    def __init__(self, output: str, rows_read: dict[int, int], data: str, source: str, options: dict | None,
                 unpaired: bool = False):
        storage.configure(options)
        self.output, self.rows_read, self.data, self.source = output, rows_read, data, source
        self.unpaired = unpaired
        self.pending: dict[int, dict[str, dict]] = {}

    def add(self, k: int, table: pa.Table) -> list[dict]:
        """Rows of shard k; returns [its manifest entry] when they complete it, else []."""
        rows = self.pending.setdefault(k, {})
        for r in table.to_pylist():
            rows[r["row_key"]] = r
        if len(rows) < self.rows_read[k]:
            return []
        del self.pending[k]
        return [write_shard(self.output, k, list(rows.values()), self.rows_read[k], self.data, self.source,
                            self.unpaired)]


def deliver(batch: pa.Table, writers: list) -> pa.Table:
    """Ray Data step: hand each shard's rows of a scored batch to its writer; one row out for the driver."""
    import ray

    entries = []
    for k in pc.unique(batch["shard"]).to_pylist():
        entries += ray.get(writers[k % len(writers)].add.remote(k, batch.filter(pc.equal(batch["shard"], k))))
    kept = batch.filter(pc.is_null(batch["reject_reason"]))
    lengths = [pc.sum(pc.list_value_length(kept[c])).as_py() or 0 for c in ("prompt_ids", "chosen_ids", "rejected_ids")]
    return pa.table({"rows": [len(batch)], "pairs": [len(kept)], "tokens": [2 * lengths[0] + lengths[1] + lengths[2]],
                     "entries": [json.dumps(entries)]})
