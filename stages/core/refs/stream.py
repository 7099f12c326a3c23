"""Stream reference shards for training: manifest checks, checksums, row groups, a bounded shuffle.

The order of pairs in an epoch depends only on the manifest, the seed and the epoch: shard order
is shuffled per epoch, then rows pass through a shuffle buffer of bounded size. So a run can be
resumed from a cursor (epoch, pairs consumed), and every Ray Train worker sees the same global
order and keeps its own slice of each batch. Memory holds one shard's file, one row group and the
buffer, never the whole set.

A shard is read once per visit, its bytes checked against the manifest's checksum, and its rows read
from those same bytes: a trainer trains only on the files its manifest (read once, at the start:
pinned) describes. A shard replaced since (a precompute that repaired or overwrote it) stops the run
with one line naming the file, however many epochs in; shards added since are not in its manifest.

Every row is checked as it is read (`row_problem`): it must fit the manifest's truncation rule and
the policy's vocabulary, so an edited manifest or a foreign shard stops with the shard file and
pair named instead of a PyTorch error steps later.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from schemas import SHARD_SCHEMA, UNPAIRED_SHARD_SCHEMA, SchemaError
from stages.core import storage
from stages.core.errors import PipelineError
from stages.core.refs.manifest import Manifest

COLUMNS = ["pair_id", "prompt_ids", "chosen_ids", "rejected_ids", "ref_chosen_logps", "ref_rejected_logps",
           "chosen_scored_tokens", "rejected_scored_tokens"]
UNPAIRED_COLUMNS = ["example_id", "prompt_ids", "completion_ids", "label", "ref_logps", "completion_scored_tokens",
                    "kl_completion_ids", "ref_kl_logps", "kl_scored_tokens"]


class ShardError(PipelineError):
    """A missing, corrupt or mismatched shard or manifest; the message names the file."""


@dataclass(frozen=True)
class Refs:
    root: str
    manifest: Manifest
    # The policy's vocabulary (embedding rows): every token id read must be below it. None until a
    # model is loaded; then token ids are only checked to be >= 0.
    vocab_size: int | None = None

    @property
    def num_pairs(self) -> int:
        return self.manifest.rows_written

    @property
    def kind(self) -> str:
        """'paired' (preference pairs) or 'unpaired' (KTO examples)."""
        return self.manifest.kind

    def shard_urls(self) -> list[str]:
        return [storage.join(self.root, s.path) for s in self.manifest.shards]


def load_refs(root: str, vocab_size: int | None = None) -> Refs:
    url = storage.join(root, "manifest.json")
    if not storage.exists(url):
        raise ShardError(f"no manifest.json in {root}: run `python pipeline.py precompute --output {root}` first")
    try:
        manifest = Manifest.read(url)
    except (ValueError, SchemaError) as e:  # json.JSONDecodeError is a ValueError
        raise ShardError(f"{url}: {e}") from None
    return Refs(root, manifest, vocab_size)


def check_tokenizer(refs: Refs, hashes: dict[str, str]) -> None:
    """The policy's tokenizer and chat template must be the ones that made the token ids."""
    made = {"tokenizer_hash": refs.manifest.tokenizer_hash, "chat_template_hash": refs.manifest.chat_template_hash}
    diff = [f"{k}: shards {made[k][:12]}..., policy {hashes[k][:12]}..." for k in made if made[k] != hashes[k]]
    if diff:
        raise ShardError(f"the policy's tokenizer differs from the one that scored {refs.root} ({'; '.join(diff)}); "
                         "train with the reference model's tokenizer or re-run precompute")


def verified_shard(url: str, sha256: str, kind: str = "paired") -> pq.ParquetFile:
    """The shard, read whole once and checked against the manifest's checksum and the Parquet schema; the rows
    read from the file returned are the bytes that were checked (no second read that could see another file)."""
    try:
        data = storage.read_bytes(url)
    except FileNotFoundError:
        raise ShardError(f"shard missing: {url} (listed in the manifest)") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise ShardError(f"shard {url}: checksum {digest[:16]}... does not match the manifest's "
                         f"{sha256[:16]}...: the file changed or is truncated")
    try:
        pf = pq.ParquetFile(pa.BufferReader(data))
        schema = pf.schema_arrow
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise ShardError(f"shard {url} is not readable Parquet: {e}") from None
    expected, columns = (UNPAIRED_SHARD_SCHEMA, UNPAIRED_COLUMNS) if kind == "unpaired" else (SHARD_SCHEMA, COLUMNS)
    for field in expected:
        found = schema.field(field.name).type if field.name in schema.names else None
        if field.name in columns and (found is None or not found.equals(field.type)):
            raise ShardError(f"shard {url}: column '{field.name}' missing or not {field.type}")
    return pf


def verify_shard(url: str, sha256: str, kind: str = "paired") -> None:
    """Check the shard's checksum and schema (`verified_shard`), keeping nothing."""
    verified_shard(url, sha256, kind)


def _rows(pf: pq.ParquetFile, kind: str) -> Iterator[dict]:
    for i in range(pf.num_row_groups):
        if kind == "unpaired":
            yield from map(as_pair, pf.read_row_group(i, columns=UNPAIRED_COLUMNS).to_pylist())
        else:
            yield from pf.read_row_group(i, columns=COLUMNS).to_pylist()


def iter_rows(url: str, kind: str = "paired", pf: pq.ParquetFile | None = None) -> Iterator[dict]:
    """Rows of one shard, a row group at a time (from `pf`, a verified shard, when given); unpaired examples in
    the shape of a pair (`as_pair`)."""
    try:
        if pf is not None:
            yield from _rows(pf, kind)
            return
        with storage.open_binary(url) as fh:
            yield from _rows(pq.ParquetFile(fh), kind)
    except (OSError, ValueError) as e:
        raise ShardError(f"shard {url} could not be read: {e}") from None


def as_pair(row: dict) -> dict:
    """An unpaired example as the policy pass runs it: the completion as chosen, the KL completion as
    rejected (one packed row, the prompt once), plus `label` and `kl` (whether it has a KL completion;
    without one the completion stands in, and its KL values are not used)."""
    kl = row["ref_kl_logps"] is not None
    return {"pair_id": row["example_id"], "prompt_ids": row["prompt_ids"], "chosen_ids": row["completion_ids"],
            "rejected_ids": row["kl_completion_ids"] if kl else row["completion_ids"],
            "ref_chosen_logps": row["ref_logps"], "ref_rejected_logps": row["ref_kl_logps"] if kl else row["ref_logps"],
            "chosen_scored_tokens": row["completion_scored_tokens"],
            "rejected_scored_tokens": row["kl_scored_tokens"] if kl else row["completion_scored_tokens"],
            "label": row["label"], "kl": kl}


def scored_count(prompt_len: int, completion_len: int, max_length: int | None, truncation_mode: str) -> int:
    """How many tokens the scorer sums for one completion: len(seq) - max(start, 1) of
    `tokenization.scored_sequence`, from the lengths alone (no list is built)."""
    length, start = prompt_len + completion_len, prompt_len
    if max_length is not None and length > max_length:
        if truncation_mode != "keep_start":
            start = max(0, start - (length - max_length))
        length = max_length
    return max(0, length - max(start, 1))


def _bad_id(ids: list[int], vocab_size: int | None) -> int | None:
    low, high = min(ids), max(ids)
    if low < 0:
        return low
    return high if vocab_size is not None and high >= vocab_size else None


def row_problem(row: dict, max_length: int | None, truncation_mode: str, vocab_size: int | None) -> str | None:
    """What makes a shard row unusable under the manifest's rule and the policy's vocabulary, or None.

    Integer checks on lists already in memory: the rows precompute writes always pass, so a failure
    means an edited manifest, another model's shards, or a shard not written by precompute.
    """
    prompt = row["prompt_ids"]
    for key in ("prompt_ids", "chosen_ids", "rejected_ids"):
        if not row[key]:
            return f"{key} is empty"
    rule = f"the manifest's max_length {max_length} and truncation_mode {truncation_mode}"
    if max_length is not None and truncation_mode == "keep_start":
        for key in ("chosen", "rejected"):
            n = len(prompt) + len(row[f"{key}_ids"])
            if n > max_length:  # precompute cut them to fit: the manifest says less than the shard was made with
                return (f"prompt + {key} is {n} tokens, over the manifest's max_length {max_length}: the manifest "
                        "was edited or the shard was written with other settings; restore it or re-run precompute")
    for key in ("prompt_ids", "chosen_ids", "rejected_ids"):
        bad = _bad_id(row[key], vocab_size)
        if bad is not None:
            size = f" of {vocab_size} tokens" if vocab_size is not None else ""
            return (f"token id {bad} in {key} is outside the vocabulary{size} of the policy: the shards were made "
                    "with another tokenizer or model")
    for key in ("chosen", "rejected"):
        expected = scored_count(len(prompt), len(row[f"{key}_ids"]), max_length, truncation_mode)
        if expected == 0:
            return f"no token of {key}_ids is scored under {rule}"
        if row[f"{key}_scored_tokens"] != expected:
            return (f"{key}_scored_tokens is {row[f'{key}_scored_tokens']}, but {rule} imply {expected}: the "
                    "manifest was edited or the shard was written with other settings; restore it or re-run "
                    "precompute")
    return None


def epoch_pairs(refs: Refs, epoch: int, seed: int, buffer_size: int, verify: bool = True) -> Iterator[dict]:
    """All pairs of the set in this epoch's order, each checked by `row_problem` as it is read."""
    rng = random.Random(f"{seed}:{epoch}")  # string seeds hash the same in every process
    shards = list(refs.manifest.shards)
    rng.shuffle(shards)
    max_length, mode = refs.manifest.truncation.max_length, refs.manifest.truncation.mode
    buffer: list[dict] = []
    for shard in shards:
        url = storage.join(refs.root, shard.path)
        for row in iter_rows(url, refs.kind, verified_shard(url, shard.sha256, refs.kind) if verify else None):
            problem = row_problem(row, max_length, mode, refs.vocab_size)
            if problem is not None:
                raise ShardError(f"shard {url}: pair {row['pair_id']}: {problem}")
            if len(buffer) < buffer_size:
                buffer.append(row)
                continue
            j = rng.randrange(buffer_size)
            buffer[j], row = row, buffer[j]
            yield row
    rng.shuffle(buffer)
    yield from buffer


def batches(refs: Refs, batch_size: int, seed: int, buffer_size: int, start_epoch: int = 0, skip: int = 0,
            verify: bool = True) -> Iterator[tuple[int, int, list[dict]]]:
    """(epoch, pairs consumed in the epoch after this batch, batch), forever; the last batch of an
    epoch may be smaller. `skip` pairs of `start_epoch` are passed over (resume)."""
    epoch = start_epoch
    while True:
        consumed, batch = 0, []
        for row in epoch_pairs(refs, epoch, seed, buffer_size, verify):
            consumed += 1
            if consumed <= skip:
                continue
            batch.append(row)
            if len(batch) == batch_size:
                yield epoch, consumed, batch
                batch = []
        if batch:
            yield epoch, consumed, batch
        if consumed == 0:
            raise ShardError(f"{refs.root} holds no {'examples' if refs.kind == 'unpaired' else 'pairs'}")
        epoch, skip = epoch + 1, 0
