"""Which input rows a precompute run scores, and into which shard: Ray tasks and two hash shuffles,
so that no process, the driver least of all, holds every row or every key.

1. Count: one Ray task per input unit (a file; a row range of a `save_to_disk` folder) counts its rows
   (JSON Lines without parsing them); the driver turns the counts into each unit's first source_index.
   So a row's source_index is its row number in the input, files in name order, as when one process
   read them all.
2. Read: Ray Data tasks read the units in blocks of READ_ROWS rows, normalise each row, hash its raw
   content and its pair (`pair_id`), and give a row that cannot be used its reject reason.
3. Copies: a hash shuffle by content hash brings every copy of a row, and every row key of the output
   with that hash, into one block. The k-th copy (by source_index) gets the row key `hash:k`; a key the
   output holds is done, a key of a shard being scored again goes back into that shard.
4. Duplicates: a hash shuffle by pair_id brings every row of a pair, and the output's copy of the pair
   if it has one, into one block: the lowest source_index is kept, the others become `duplicate`
   rejects, as are all of them when the output already holds the pair.
5. Shards: the rows left are sorted by source_index; counts per sorted block, summed in the driver (one
   number per block), give each new row its rank among the new rows, and so its shard:
   first + rank // rows_per_shard. The result is cut into chunks for the tokenize tasks.

The steps on one block: 3 and 4 in `duplicates`, 5 in `sharding`; here the reads and the driver's
side (`build_plan`), and the KL pairing of unpaired data.

What the driver holds: one count per unit and per block, one row count per shard, object references.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from stages.core import storage
from stages.core.inputs.files import BOM, BrokenStream, DataError, MalformedRow, base_suffix, byte_lines, read_file
from stages.core.inputs.folders import list_input_files, resolve_source
from stages.core.inputs.formats import Columns, RowRejected, normalise
from stages.core.inputs.readers import is_saved_dataset, load_split, looks_like_hub_name
from stages.core.inputs.unpaired import normalise_unpaired, unpair
from stages.core.refs.duplicates import (
    DONE,
    INPUT,
    KNOWN,
    PAIR,
    PLAN_SCHEMA,
    REDO,
    count_kind,
    kinds,
    mark_duplicates,
    number_copies,
    plan_in_one_task,
)
from stages.core.refs.sharding import CHUNK_ROWS, Plan, assign_shards

READ_ROWS = 2048        # rows per block a read task yields
DATASET_ROWS = 50_000   # rows of a save_to_disk folder one read task takes
PARTITION_ROWS = 50_000  # rows per hash partition of the shuffles


def _json(value) -> str:
    return json.dumps(value, ensure_ascii=False, default=str)


def pair_id(row: dict) -> str:
    """Content hash of the normalised prompt/chosen/rejected (an unpaired example's prompt/completion/label:
    its example_id): stable across runs, file order and index."""
    fields = ([row["prompt"], row["completion"], row["label"]] if "completion" in row
              else [row["prompt"], row["chosen"], row["rejected"]])
    body = json.dumps([*fields, row.get("tools")], sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(body.encode("utf-8")).hexdigest()[:32]


def content_hash(raw) -> str:
    """Hash of an input row's raw content (a malformed line's text)."""
    text = raw.text if isinstance(raw, MalformedRow) else json.dumps(raw, sort_keys=True, ensure_ascii=False,
                                                                     default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


@dataclass(frozen=True)
class Source:
    """What `--data` names: files (read one task each), or a datasets folder or hub name (row ranges)."""

    data: str
    split: str
    files: tuple[str, ...]  # empty for a datasets source
    options: dict | None = None

    @classmethod
    def of(cls, data: str, split: str, options: dict | None) -> "Source":
        path = resolve_source(data)
        if "://" not in path and os.path.exists(path):
            path = os.path.abspath(path)  # tasks run in other folders than the driver
        if looks_like_hub_name(path) or is_saved_dataset(path, options):
            return cls(path, split, (), options)
        return cls(path, split, tuple(list_input_files(path, options)), options)


# --- 1. count ------------------------------------------------------------------------------------

def count_jsonl(url: str, options: dict | None) -> int:
    """Rows `read_file` yields for a JSON Lines file, without parsing them: one per non-blank line,
    and one for the broken end of a cut archive."""
    n = 0
    with storage.open_binary(url, options) as fh:
        try:
            for lineno, line in enumerate(byte_lines(fh), start=1):
                if lineno == 1 and line.startswith(BOM):
                    line = line[len(BOM):]
                n += bool(line.strip())
        except BrokenStream:
            n += 1
    return n


def count_unit(source: Source, url: str | None) -> int:
    """Rows of one file, or (url None) of the datasets source."""
    storage.configure(source.options)
    if url is None:
        return len(load_split(source.data, source.split, source.options))
    kind = base_suffix(url)
    if kind == ".jsonl":
        return count_jsonl(url, source.options)
    if kind == ".parquet":
        with storage.open_binary(url, source.options) as fh:
            try:
                return pq.ParquetFile(fh).metadata.num_rows
            except pa.ArrowInvalid as e:
                raise DataError(f"{url}: not a readable Parquet file: {str(e)[:300]}") from None
    return sum(1 for _ in read_file(url, source.options))


def units(source: Source, limit: int | None) -> tuple[list[dict], int]:
    """Read units with their first source_index, and the number of rows to read: counted by Ray tasks."""
    import ray

    count = ray.remote(num_cpus=0.5)(count_unit)
    urls = list(source.files) or [None]
    counts = ray.get([count.options(name=f"count {u or source.data}").remote(source, u) for u in urls])
    result, first = [], 0
    for url, n in zip(urls, counts):
        if url is None:  # a datasets source: ranges of DATASET_ROWS rows
            result += [{"url": "", "first": first + s, "start": s, "stop": min(s + DATASET_ROWS, n)}
                       for s in range(0, n, DATASET_ROWS)]
        elif n:
            result.append({"url": url, "first": first, "start": 0, "stop": n})
        first += n
    total = first if limit is None else min(first, limit)
    return [u for u in result if u["first"] < total], total


# --- 2. read -------------------------------------------------------------------------------------

def _unit_rows(source: Source, unit: dict):
    if unit["url"]:
        return read_file(unit["url"], source.options)
    ds = load_split(source.data, source.split, source.options)
    return (ds[i] for i in range(unit["start"], unit["stop"]))


def _plan_row(index: int, raw, layout: str, columns: Columns) -> dict:
    h = content_hash(raw)
    try:
        if isinstance(raw, MalformedRow):
            raise RowRejected(getattr(raw, "reason", "malformed_json"), f"{raw.file} line {raw.line}: {raw.error}")
        row = normalise_unpaired(raw, columns) if layout == "unpaired" else normalise(raw, layout, columns)
        return {"source_index": index, "h": h, "pair_id": pair_id(row), "raw": _json(raw), "row_json": _json(row),
                "kind": INPUT}
    except RowRejected as e:
        text = raw.text if isinstance(raw, MalformedRow) else _json(raw)
        return {"source_index": index, "h": h, "reject_reason": e.reason, "reject_detail": e.detail, "raw": text,
                "kind": INPUT}


def _unpaired_halves(index: int, raw, layout: str, columns: Columns) -> list[dict]:
    """--unpair: input row `index` (a pair) -> its two examples, source_index 2*index (chosen, desirable)
    and 2*index + 1 (rejected, undesirable), as TRL's unpair_preference_dataset; each half has its own
    content hash, so copies and re-runs work per example. A row that is no usable pair is one reject."""
    row = _plan_row(index, raw, layout, columns)
    if row.get("reject_reason") is not None:
        return [{**row, "source_index": 2 * index}]
    out = []
    for half, example in enumerate(unpair(json.loads(row["row_json"]))):
        h = hashlib.sha256(f"{row['h']}:{half}".encode()).hexdigest()[:32]
        out.append({**row, "source_index": 2 * index + half, "h": h, "pair_id": pair_id(example),
                    "row_json": _json(example)})
    return out


def read_units(batch: pa.Table, source: Source, layout: str, cfg, total: int):
    """Ray Data step: each unit of the batch -> blocks of plan rows (input rows below `total`)."""
    storage.configure(source.options)
    unpairing, columns = getattr(cfg, "unpair", False), Columns.of(cfg)
    for unit in batch.to_pylist():
        rows, index = [], unit["first"]
        for raw in _unit_rows(source, unit):
            if index >= total:
                break
            if unpairing:
                rows += _unpaired_halves(index, raw, layout, columns)
            else:
                rows.append(_plan_row(index, raw, layout, columns))
            index += 1
            if len(rows) >= READ_ROWS:
                yield pa.Table.from_pylist(rows, schema=PLAN_SCHEMA)
                rows = []
        if rows:
            yield pa.Table.from_pylist(rows, schema=PLAN_SCHEMA)


def read_known(batch: pa.Table, output: str, options: dict | None):
    """Ray Data step: the output's files -> KNOWN row keys (shards and rejects), PAIR rows (shards),
    REDO row keys (the keys of a shard to score again, with its index)."""
    storage.configure(options)
    for item in batch.to_pylist():
        url = storage.join(output, item["path"])
        if item["what"] == "redo":
            keys = _redo_keys(url)
        else:
            with storage.open_binary(url) as fh:
                names = pq.ParquetFile(fh).schema_arrow.names
                id_column = "pair_id" if "pair_id" in names else "example_id"  # a paired or an unpaired shard
                table = pq.read_table(fh, columns=["row_key"] + ([id_column] if item["what"] == "shard" else []))
            keys = table.column("row_key").to_pylist()
        h, n = zip(*(k.rsplit(":", 1) for k in keys)) if keys else ((), ())
        kind = REDO if item["what"] == "redo" else KNOWN
        yield _full(pa.Table.from_pydict({"h": list(h), "n": [int(x) for x in n], "kind": [kind] * len(keys),
                                          "shard": [item["shard"]] * len(keys)},
                                         schema=_part(PLAN_SCHEMA, "h", "n", "kind", "shard")))
        if item["what"] == "shard":
            pairs = table.column(id_column)
            yield _full(pa.Table.from_pydict({"pair_id": pairs, "kind": pa.array([PAIR] * len(pairs), pa.int8()),
                                              "held_in": [item["path"]] * len(pairs)},
                                             schema=_part(PLAN_SCHEMA, "pair_id", "kind", "held_in")))


def _redo_keys(url: str) -> list[str]:
    """The row keys of a shard to score again: its keys file, or the `row_keys` of an older marker."""
    if url.endswith(".parquet"):
        with storage.open_binary(url) as fh:
            return pq.read_table(fh).column("row_key").to_pylist()
    try:
        return storage.read_json(url).get("row_keys") or []
    except (FileNotFoundError, ValueError):
        return []


def _part(schema: pa.Schema, *names: str) -> pa.Schema:
    return pa.schema([schema.field(n) for n in names])


def _full(table: pa.Table) -> pa.Table:
    """A table with some of PLAN_SCHEMA's columns -> all of them (nulls), in order: union needs one schema."""
    cols = [table.column(f.name) if f.name in table.column_names else pa.nulls(len(table), f.type)
            for f in PLAN_SCHEMA]
    return pa.Table.from_arrays(cols, schema=PLAN_SCHEMA)


def build_plan(cfg, source: Source, layout: str, known_files: list[dict], first: int) -> Plan:
    """Steps 1-5 over the input and the output's files (`known_files`: {"what": shard|rejects|redo, "path",
    "shard"}); new shards are numbered from `first`."""
    import ray
    import ray.data

    unit_list, inputs = units(source, cfg.limit)
    if not inputs:
        return Plan([], {}, 0, 0)
    total = inputs  # plan rows: with --unpair, up to two per input row (a rejected pair is one)
    rows = ray.data.from_items(unit_list, override_num_blocks=len(unit_list)).map_batches(
        read_units, batch_size=1, batch_format="pyarrow",
        fn_kwargs=dict(source=source, layout=layout, cfg=cfg, total=inputs))
    if getattr(cfg, "unpair", False):
        rows = rows.materialize()
        total = rows.count()  # the examples (and rejected rows) the input rows made
    parts = max(1, -(-total // PARTITION_ROWS))
    known = None
    if known_files:
        known = ray.data.from_items(known_files, override_num_blocks=min(len(known_files), 64)).map_batches(
            read_known, batch_size=1, batch_format="pyarrow",
            fn_kwargs=dict(output=cfg.output, options=source.options)).materialize()
    if parts == 1:  # a set that fits one partition: steps 3 and 4 in one task, without a shuffle's start-up
        refs = rows.materialize().to_arrow_refs() + (known.to_arrow_refs() if known is not None else [])
        ordered, done = ray.remote(num_cpus=0.5, num_returns=2)(plan_in_one_task).remote(*refs)
        already_done = ray.get(done)
        if already_done == total:
            return Plan([], {}, already_done, 0)
        return assign_shards(cfg, [ordered], first, already_done, total - already_done)
    if known is not None:
        rows = rows.union(known.map_batches(_keys_only, batch_size=None, batch_format="pyarrow"))
    copies = rows.repartition(parts, keys=["h"]).map_batches(number_copies, batch_size=None,
                                                             batch_format="pyarrow").materialize()
    done = copies.map_batches(count_kind, batch_size=None, batch_format="pyarrow", fn_kwargs=dict(kind=DONE))
    already_done = int(done.sum("rows") or 0)
    if already_done == total:
        return Plan([], {}, already_done, 0)
    paired = copies.map_batches(kinds, batch_size=None, batch_format="pyarrow", fn_kwargs=dict(kind=INPUT, paired=True))
    if known is not None:
        paired = paired.union(known.map_batches(kinds, batch_size=None, batch_format="pyarrow",
                                                fn_kwargs=dict(kind=PAIR)))
    checked = paired.repartition(parts, keys=["pair_id"]).map_batches(mark_duplicates, batch_size=None,
                                                                      batch_format="pyarrow")
    unpaired = copies.map_batches(kinds, batch_size=None, batch_format="pyarrow",
                                  fn_kwargs=dict(kind=INPUT, paired=False))
    ordered = checked.union(unpaired).sort("source_index").materialize()
    return assign_shards(cfg, ordered.to_arrow_refs(), first, already_done, total - already_done)


# --- 6. KL pairing (unpaired data) -----------------------------------------------------------------

KL_PAIRING = ("each example's KL completion is the completion_ids of the next example, on a cycle through its "
              "shard's examples in the order of random.Random(f'{seed}:{shard}').shuffle, whose completion "
              "differs from its own; none when no example of the shard does")


def kl_partners(completions: list, seed: int, shard: int) -> list[int | None]:
    """For each example of a shard (in source_index order), the example whose completion is its KL
    completion: a seeded shuffle of the shard laid out as one cycle, each example paired with the next
    one on it whose completion differs (never itself, never an identical completion); None when the
    shard has no such example. Depends only on the shard's examples, the seed and the shard index, so
    not on batch size, workers or shuffling; every completion serves as a KL completion about once."""
    import random

    n = len(completions)
    order = list(range(n))
    random.Random(f"{seed}:{shard}").shuffle(order)
    keys = [json.dumps(c, sort_keys=True, ensure_ascii=False) for c in completions]
    partners: list[int | None] = [None] * n
    for j, i in enumerate(order):
        for step in range(1, n):
            k = order[(j + step) % n]
            if keys[k] != keys[i]:
                partners[i] = k
                break
    return partners


def pair_shard(shard: int, seed: int, chunk: int, pieces: int, *chunks: pa.Table) -> list[pa.Table] | pa.Table:
    """Ray task: shard `shard`'s rows gathered from the chunks that hold them, each kept unpaired row's
    normalised JSON given the `kl_completion` of its partner (`kl_partners`; null without one); cut into
    `pieces` chunks of up to `chunk` rows."""
    table = pa.concat_tables(chunks)
    table = table.filter(pc.equal(table["shard"], shard)).sort_by("source_index")
    kept = pc.is_null(table["reject_reason"]).to_pylist()
    texts = table.column("row_json").to_pylist()
    rows = {i: json.loads(t) for i, (t, ok) in enumerate(zip(texts, kept)) if ok}
    at = sorted(rows)
    partners = kl_partners([rows[i]["completion"] for i in at], seed, shard)
    for i, p in zip(at, partners):  # the partner's prompt too: its completion is tokenized as it is (TRL)
        partner = rows[at[p]] if p is not None else {}
        texts[i] = _json({**rows[i], "kl_prompt": partner.get("prompt"), "kl_completion": partner.get("completion")})
    table = table.set_column(table.schema.get_field_index("row_json"), "row_json", pa.array(texts, pa.string()))
    parts = [table.slice(i * chunk, chunk) for i in range(pieces)]
    return parts if pieces > 1 else parts[0]


def shards_in(block: pa.Table) -> list[int]:
    return pc.unique(block["shard"]).to_pylist()


def pair_kl(plan: "Plan", seed: int, chunk_rows: int = CHUNK_ROWS) -> "Plan":
    """The plan's chunks regrouped by shard with each example's KL completion (unpaired data): one
    task per shard reads the chunks holding its rows (the driver holds one list of shard numbers per
    chunk). A shard scored again (a repair) gets the same pairing, since it gets the same rows."""
    import ray

    covers = ray.get([ray.remote(num_cpus=0.1)(shards_in).remote(c) for c in plan.chunks])
    holding: dict[int, list] = {}
    for ref, shards in zip(plan.chunks, covers):
        for k in shards:
            holding.setdefault(k, []).append(ref)
    task = ray.remote(num_cpus=0.25)(pair_shard)
    chunks = []
    for k in sorted(holding):
        pieces = max(1, -(-plan.rows_read[k] // chunk_rows))
        out = task.options(num_returns=pieces).remote(k, seed, chunk_rows, pieces, *holding[k])
        chunks += out if pieces > 1 else [out]
    return Plan(chunks, plan.rows_read, plan.already_done, plan.rows, unpaired=True)


def _keys_only(block: pa.Table) -> pa.Table:
    return block.filter(pc.is_in(block["kind"], pa.array([KNOWN, REDO], pa.int8())))
