"""Steps 3 and 4 of precompute's plan, one block at a time (Ray Data map_batches after each hash
shuffle, or all of a small set in one task): the copies of a row numbered into row keys, with the rows
the output holds marked done; every row of a pair but the first made a `duplicate` reject. Also the
plan rows' columns (PLAN_SCHEMA) and kinds, which every step of the plan passes on.
"""

from __future__ import annotations

import json
from collections import Counter

import pyarrow as pa
import pyarrow.compute as pc

INPUT, DONE, KNOWN, REDO, PAIR = 0, 1, 2, 3, 4  # what a plan row stands for (`kind`)
PLAN_SCHEMA = pa.schema([
    ("source_index", pa.int64()),
    ("h", pa.string()),              # content hash of the raw row
    ("pair_id", pa.string()),        # null for a row rejected before it became a pair
    ("reject_reason", pa.string()),
    ("reject_detail", pa.string()),
    ("raw", pa.string()),            # the raw row as JSON (a bad line's text): what a reject keeps
    ("row_json", pa.string()),       # the normalised row
    ("kind", pa.int8()),
    ("n", pa.int64()),               # KNOWN, REDO: which copy the output's key names
    ("shard", pa.int64()),           # REDO: the shard to score it into; after step 5 every row's shard
    ("held_in", pa.string()),        # PAIR: the shard file that holds the pair
    ("row_key", pa.string()),
])


# --- 3. copies -----------------------------------------------------------------------------------

def number_copies(block: pa.Table) -> pa.Table:
    """Ray Data step after the shuffle by content hash (whole hash groups per block): row keys, and which
    input rows the output already holds (kind DONE) or a shard being scored again wants (its index)."""
    known, redo = set(), {}
    for h, n, kind, k in zip(*(block.column(c).to_pylist() for c in ("h", "n", "kind", "shard"))):
        if kind == KNOWN:
            known.add(f"{h}:{n}")
        elif kind == REDO:
            redo[f"{h}:{n}"] = k
    rows = block.filter(pc.equal(block["kind"], INPUT)).sort_by([("h", "ascending"), ("source_index", "ascending")])
    keys, kinds, shards, copies = [], [], [], Counter()
    for h in rows.column("h").to_pylist():
        key = f"{h}:{copies[h]}"
        copies[h] += 1
        keys.append(key)
        kinds.append(DONE if key in known else INPUT)
        shards.append(redo.get(key))
    return _with(_with(_with(rows, "row_key", keys), "kind", kinds), "shard", shards)


def _with(table: pa.Table, name: str, values: list) -> pa.Table:
    """`table` with column `name` replaced by `values` (of PLAN_SCHEMA's type)."""
    i = table.schema.get_field_index(name)
    return table.set_column(i, PLAN_SCHEMA.field(name), pa.array(values, PLAN_SCHEMA.field(name).type))


def kinds(block: pa.Table, kind: int, paired: bool | None = None) -> pa.Table:
    """Rows of one kind; with `paired`, only those with (True) or without (False) a pair id."""
    mask = pc.equal(block["kind"], kind)
    if paired is not None:
        has = pc.is_valid(block["pair_id"])
        mask = pc.and_(mask, has if paired else pc.invert(has))
    return block.filter(mask)


def count_kind(block: pa.Table, kind: int) -> pa.Table:
    return pa.table({"rows": [pc.sum(pc.equal(block["kind"], kind)).as_py() or 0]})


# --- 4. duplicates -------------------------------------------------------------------------------

def mark_duplicates(block: pa.Table) -> pa.Table:
    """Ray Data step after the shuffle by pair id (whole pairs per block): every input row of a pair but
    the first becomes a `duplicate` reject; all of them when the output already holds the pair."""
    held = {p: w for p, w, kind in zip(*(block.column(c).to_pylist() for c in ("pair_id", "held_in", "kind")))
            if kind == PAIR}
    rows = block.filter(pc.equal(block["kind"], INPUT)).sort_by("source_index")
    first: dict[str, str] = {}
    reasons, details = rows.column("reject_reason").to_pylist(), rows.column("reject_detail").to_pylist()
    texts = rows.column("row_json").to_pylist()
    for i, (pid, index) in enumerate(zip(rows.column("pair_id").to_pylist(), rows.column("source_index").to_pylist())):
        if pid in held or pid in first:
            reasons[i], details[i] = "duplicate", _duplicate_detail(texts[i], first.get(pid), held.get(pid))
        else:
            first[pid] = f"source_index {index}"
    return _with(_with(rows, "reject_reason", reasons), "reject_detail", details)


def _duplicate_detail(row_json: str | None, earlier: str | None, held_in: str | None) -> str:
    """What a duplicate repeats, in the words of its kind: an unpaired example (KTO data, --unpair) is no pair."""
    unpaired = row_json is not None and "completion" in json.loads(row_json)
    fields, what = ("prompt/completion/label", "an example") if unpaired else ("prompt/chosen/rejected", "a pair")
    return f"same {fields} as " + (f"{what} already in {held_in}" if held_in else earlier)


def plan_in_one_task(*blocks: pa.Table) -> tuple[pa.Table, int]:
    """Steps 3 and 4 over the whole of a small set in one Ray task: (rows left, sorted; rows done).
    The same functions as the shuffles run per partition, so the same result."""
    block = pa.concat_tables(blocks)
    copies = number_copies(block.filter(pc.invert(pc.equal(block["kind"], PAIR))))
    checked = mark_duplicates(pa.concat_tables([kinds(copies, INPUT, paired=True), kinds(block, PAIR)]))
    ordered = pa.concat_tables([checked, kinds(copies, INPUT, paired=False)]).sort_by("source_index")
    return ordered, pc.sum(pc.equal(copies["kind"], DONE)).as_py() or 0
