"""Training faults that must end in one named error, not a PyTorch traceback: shard rows that do
not fit the manifest or the model (checked as they stream), and a disk that fills up mid-run."""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_train import _copy, _rewrite_shard, cfg_for, untimed

from schemas import SHARD_SCHEMA
from stages import train
from stages.core.refs.manifest import Manifest
from stages.core.refs.stream import Refs, ShardError, epoch_pairs, row_problem, scored_count
from stages.core.scoring.truncation import Truncation
from stages.core.storage import StorageError
from stages.core.training import checkpoint
from stages.core.training.metrics import read

# ------------------------------------------------------------------------------------------------
# Shard rows checked against the manifest and the policy's vocabulary


def test_scored_count_is_the_scorers_count():
    """The cheap length arithmetic gives what the scorer counted: len(seq) - max(start, 1)."""
    for p, c, max_length, mode in itertools.product(range(0, 6), range(1, 6), (None, 1, 2, 4, 7),
                                                    ("keep_start", "keep_end")):
        seq, start = Truncation(max_length, mode=mode).scored_sequence(list(range(p)), list(range(c)))
        assert scored_count(p, c, max_length, mode) == max(0, len(seq) - max(start, 1)), (p, c, max_length, mode)


def _row(prompt=(1, 2, 3), chosen=(4, 5), rejected=(6,), scored=None, pair_id="pair-a"):
    return {"pair_id": pair_id, "source_index": 0, "row_key": pair_id, "prompt_ids": list(prompt),
            "chosen_ids": list(chosen), "rejected_ids": list(rejected),
            "ref_chosen_logps": -1.0, "ref_rejected_logps": -2.0,
            "chosen_scored_tokens": len(chosen) if scored is None else scored[0],
            "rejected_scored_tokens": len(rejected) if scored is None else scored[1]}


def _refs(tmp_path: Path, rows: list[dict], max_length, mode="keep_start", vocab_size=None) -> Refs:
    (tmp_path / "shards").mkdir(exist_ok=True)
    columns = {f.name: [r.get(f.name) for r in rows] for f in SHARD_SCHEMA}
    pq.write_table(pa.Table.from_pydict(columns, schema=SHARD_SCHEMA), tmp_path / "shards" / "s.parquet")
    manifest = {"format_version": 1, "created_at": "2026-01-01T00:00:00+00:00",
                "reference_model": {"name": "m", "path": "m", "weights_hash": "0" * 64}, "tokenizer_hash": "t",
                "chat_template_hash": "c", "data_source": "in.jsonl", "pair_ids_fingerprint": "0" * 64,
                "max_length": max_length, "max_prompt_length": None, "truncation_mode": mode, "dtype": "float32",
                "rows_read": len(rows), "rows_written": len(rows), "rows_rejected": 0, "rejects_by_reason": {},
                "shards": [{"path": "shards/s.parquet", "sha256": "unused", "rows": len(rows)}], "config": {}}
    return Refs(str(tmp_path), Manifest.from_json(manifest), vocab_size)


def test_good_rows_pass(tmp_path):
    rows = [_row(), _row(pair_id="b", chosen=(4, 5, 6, 7), scored=(4, 1)),
            _row(pair_id="c", prompt=(1, 2, 3, 4, 5), chosen=(6, 7, 8, 9), rejected=(10,), scored=(4, 1))]
    assert [r["pair_id"] for r in epoch_pairs(_refs(tmp_path, rows, 8, "keep_end", 11), 0, 0, 1, verify=False)] == \
        ["pair-a", "b", "c"]
    assert row_problem(_row(), 5, "keep_start", 7) is None and row_problem(_row(), None, "keep_start", None) is None


@pytest.mark.parametrize("row, max_length, mode, vocab, message", [
    (_row(chosen=()), 8, "keep_start", None, "chosen_ids is empty"),
    (_row(rejected=()), 8, "keep_start", None, "rejected_ids is empty"),
    (_row(prompt=()), 8, "keep_start", None, "prompt_ids is empty"),
    (_row(chosen=(4, 5, 6)), 5, "keep_start", None, "prompt \\+ chosen is 6 tokens, over the manifest's max_length 5"),
    (_row(rejected=(6, 7, 8, 9)), 6, "keep_start", None, "prompt \\+ rejected is 7 tokens, over"),
    (_row(chosen=(4, -1)), None, "keep_start", None, "token id -1 in chosen_ids is outside the vocabulary"),
    (_row(prompt=(1, 11, 3)), None, "keep_start", 11, "token id 11 in prompt_ids is outside the vocabulary of 11"),
    (_row(scored=(3, 1)), None, "keep_start", None, "chosen_scored_tokens is 3, but .* imply 2"),
    (_row(scored=(2, 0)), None, "keep_start", None, "rejected_scored_tokens is 0, but .* imply 1"),
    (_row(chosen=(4, 5, 6, 7, 8), rejected=(9, 10)), 4, "keep_end", None, "chosen_scored_tokens is 5, but"),
    (_row(prompt=(1,), chosen=(4,), scored=(0, 1)), 1, "keep_end", None, "no token of chosen_ids is scored"),
])
def test_bad_rows_are_named(tmp_path, row, max_length, mode, vocab, message):
    good = _row(pair_id="good", prompt=(1,), chosen=(2,), rejected=(3,))
    first = [good] if max_length != 1 else []  # under max_length 1 no token is ever scored
    refs = _refs(tmp_path, [*first, row, _row(pair_id="later", chosen=())], max_length, mode, vocab)
    with pytest.raises(ShardError, match=f"shard {re.escape(str(tmp_path))}/shards/s.parquet: pair pair-a: {message}"):
        list(epoch_pairs(refs, 0, 0, 1, verify=False))


def test_lowered_max_length_is_a_shard_error_not_a_torch_error(refs, tmp_path):
    """Editing max_length in the manifest below the stored lengths used to end in
    'element 0 of tensors does not require grad'."""
    root = _copy(refs, tmp_path)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["max_length"] = 8
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match=r"shard .*/shards/shard-0000\d\.parquet: pair [0-9a-f]{12,}: "
                                         r"prompt \+ chosen is \d+ tokens, over the manifest's max_length 8"):
        train.run(cfg_for(root, tmp_path / "run", max_steps=2))


def test_token_id_outside_the_policys_vocabulary(refs, tmp_path, tokenizer):
    """An id the embedding has no row for used to end in an IndexError from torch.embedding."""
    root = _copy(refs, tmp_path)
    table = pq.read_table(root / "shards" / "shard-00000.parquet")
    rows = table.to_pylist()
    rows[1]["chosen_ids"][-1] = len(tokenizer)  # the tiny model's embedding has len(tokenizer) rows
    _rewrite_shard(root, pa.Table.from_pylist(rows, schema=table.schema))
    with pytest.raises(ShardError, match=f"shard-00000.parquet: pair {rows[1]['pair_id']}: token id {len(tokenizer)} "
                                         f"in chosen_ids is outside the vocabulary of {len(tokenizer)}"):
        train.run(cfg_for(root, tmp_path / "run", max_steps=20))


# ------------------------------------------------------------------------------------------------
# A full disk while checkpointing. Measured on the tiny model: a checkpoint is 41.5 MB (weights
# 12.7 MB, trainer_state.pt 25.3 MB, tokenizer 3.5 MB); the run's other files are ~10 kB.

MB = 2 ** 20


def _pipeline_train(capsys, *args: str) -> tuple[int, str]:
    import pipeline

    capsys.readouterr()
    code = pipeline.main(["train", *args, "--progress", "false"])
    return code, capsys.readouterr().err


@pytest.mark.slow
def test_full_disk_at_a_checkpoint_then_resume_from_the_last_good_one(refs, tmp_path, small_disk, capsys):
    """64 MiB: step-1 fits, step-2 runs out of space in torch.save (which says only 'unexpected pos
    N vs M'). One error line, no half checkpoint left, and --resume goes on from step-1."""
    disk = small_disk(64 * MB)
    out = disk / "run"
    args = ["--refs", str(refs), "--output", str(out), "--max-steps", "3", "--save-every", "1",
            "--keep-checkpoints", "1", "--batch-size", "4", "--micro-batch-size", "2", "--learning-rate", "1e-3",
            "--shuffle-buffer", "6", "--seed", "3"]
    code, err = _pipeline_train(capsys, *args)
    assert code == 2 and [line for line in err.strip().splitlines() if not line.startswith("device: ")] == [
        f"error: cannot write {out}/checkpoints/step-2: no space left on device"], err
    assert sorted(os.listdir(out / "checkpoints")) == ["step-1"]  # the partial step-2 is gone
    assert checkpoint.latest(str(out)) == f"{out}/checkpoints/step-1"

    # The disk grows; a killed writer's leftovers are cleared on the next start.
    subprocess.run(["mount", "-o", f"remount,size={256 * MB}", str(disk)], check=True)
    (out / "checkpoints" / ".step-3.partial").mkdir()
    (out / "checkpoints" / ".step-3.partial" / "model.safetensors").write_bytes(b"half")
    code, err = _pipeline_train(capsys, *args, "--resume")
    assert code == 0, err
    assert sorted(os.listdir(out / "checkpoints")) == ["step-3"]  # the leftover .step-3.partial is gone too
    train.run(cfg_for(refs, tmp_path / "whole", max_steps=3))
    assert [r["step"] for r in read(str(out / "metrics.jsonl"))] == [1, 2, 3]
    assert untimed(read(str(out / "metrics.jsonl"))) == untimed(read(str(tmp_path / "whole" / "metrics.jsonl")))


def test_full_disk_in_the_weights_file(refs, small_disk):
    """48 MiB: step-2 runs out of space in model.safetensors (a SafetensorError from Rust)."""
    out = small_disk(48 * MB) / "run"
    with pytest.raises(StorageError, match=f"^cannot write {re.escape(str(out))}/checkpoints/step-2: no space left"):
        train.run(cfg_for(refs, out, max_steps=4, save_every=1, keep_checkpoints=1))
    assert sorted(os.listdir(out / "checkpoints")) == ["step-1"]


def test_full_disk_for_the_final_weights(refs, small_disk):
    """8 MiB: metrics fit, final/ (16 MB) does not: the run's folder is named, no traceback."""
    out = small_disk(8 * MB) / "run"
    with pytest.raises(StorageError, match=f"^cannot write {re.escape(str(out))}: no space left on device$"):
        train.run(cfg_for(refs, out, max_steps=1))
