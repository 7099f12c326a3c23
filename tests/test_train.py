"""The streaming trainer on a tiny model: ln 2 at step 0, exact resume, bad inputs (several workers:
test_parallel.py)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from conftest import make_tiny_model

from stages import train
from stages.core.config.options import TrainConfig
from stages.core.refs.stream import ShardError
from stages.core.training.metrics import TIMING, read
from stages.core.training.run_folder import TrainingError


def cfg_for(refs, out, **kw) -> TrainConfig:
    base = dict(refs=str(refs), output=str(out), batch_size=4, micro_batch_size=2, learning_rate=1e-3,
                shuffle_buffer=6, progress=False, seed=3)
    return TrainConfig(**{**base, **kw})


def untimed(records):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def test_step_zero_with_the_reference_gives_ln2(refs, tmp_path):
    summary = train.run(cfg_for(refs, tmp_path / "run", max_steps=2))
    first = read(str(tmp_path / "run" / "metrics.jsonl"))[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert abs(first[key]) < 1e-6
    assert first["rewards/accuracies"] == 0.0
    assert summary["last"]["loss"] != first["loss"]
    for key in ("step", "epoch", "loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected", "grad_norm", "lr", "tokens/s"):
        assert key in first
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")
    assert (tmp_path / "run" / "curves.png").stat().st_size > 1000
    assert list((tmp_path / "run" / "tensorboard").iterdir())


_TRAINED: dict[str, Path] = {}


def trained_run(refs, tmp_path_factory) -> Path:
    """A run that learns conftest's 20 training pairs (4 epochs, 20 steps at lr 3e-3), in a folder named "run".
    Made once a session (a module cache: conftest's fixtures are not this file's to add to) and read by
    test_training_learns_the_training_pairs, test_evaluate (eval after training) and test_online (the
    implicit judge): each of them used to train its own. Nobody writes into it but evaluations (final/eval/)."""
    if "run" not in _TRAINED:
        out = tmp_path_factory.mktemp("trained") / "run"
        train.run(cfg_for(refs, out, epochs=4, learning_rate=3e-3, warmup_ratio=0.0))
        _TRAINED["run"] = out
    return _TRAINED["run"]


@pytest.mark.slow
def test_training_learns_the_training_pairs(refs, tmp_path_factory):
    records = read(str(trained_run(refs, tmp_path_factory) / "metrics.jsonl"))
    early = sum(r["rewards/accuracies"] for r in records[:5]) / 5
    late = sum(r["rewards/accuracies"] for r in records[-5:]) / 5
    assert late > early and records[-1]["rewards/margins"] > 0


@pytest.mark.slow
def test_resume_is_exact_and_overwrite_starts_clean(refs, tmp_path):
    """A run stopped at step 5 and resumed ends as the uninterrupted run, step for step and bit for bit. The
    stopped run starts with --overwrite over an older run with more checkpoints (steps 2, 4 and 6): those
    must not outrank the new run's, nor be what its --resume finds."""
    kw = dict(max_steps=7, save_every=3, lr_scheduler="cosine", warmup_ratio=0.25)  # 5 steps an epoch
    train.run(cfg_for(refs, tmp_path / "whole", **kw))
    train.run(cfg_for(refs, tmp_path / "parts", max_steps=6, save_every=2, keep_checkpoints=5, batch_size=1,
                      micro_batch_size=1))  # the old run: one pair a step is enough for it
    stopped = train.run(cfg_for(refs, tmp_path / "parts", stop_at_step=5, overwrite=True, **kw))
    assert (stopped["outcome"], stopped["steps"], stopped["total_steps"]) == ("stopped", 5, 7)
    assert stopped["weights"] == str(tmp_path / "parts" / "checkpoints" / "step-5")
    assert sorted(p.name for p in (tmp_path / "parts" / "checkpoints").iterdir()) == ["step-3", "step-5"]
    assert (tmp_path / "parts" / "checkpoints" / "step-5").is_dir() and not (tmp_path / "parts" / "final").exists()
    assert [r["step"] for r in read(str(tmp_path / "parts" / "metrics.jsonl"))] == [1, 2, 3, 4, 5]
    assert train.summary_text(stopped).startswith("train: stopped at step 5 of 7")
    train.run(cfg_for(refs, tmp_path / "parts", resume="true", **kw))
    a = untimed(read(str(tmp_path / "whole" / "metrics.jsonl")))
    b = untimed(read(str(tmp_path / "parts" / "metrics.jsonl")))
    assert [r["step"] for r in b] == list(range(1, 8))
    assert a == b
    from safetensors.torch import load_file

    wa = load_file(tmp_path / "whole" / "final" / "model.safetensors")
    wb = load_file(tmp_path / "parts" / "final" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert sorted(p.name for p in (tmp_path / "parts" / "checkpoints").iterdir()) == ["step-5", "step-6"]


def _copy(refs, tmp_path) -> Path:
    dst = tmp_path / "refs"
    shutil.copytree(refs, dst)
    return dst


def first_shard(refs, tmp_path) -> Path:
    """A precompute output of conftest's first shard alone (5 pairs; the manifest says so): a held-out set
    that costs a quarter of the whole one to evaluate, where its size proves nothing."""
    dst = tmp_path / "first-shard"
    manifest = json.loads((refs / "manifest.json").read_text())
    entry = manifest["shards"][0]
    for part in ("path", "rejects_path"):
        (dst / entry[part]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(refs / entry[part], dst / entry[part])
    rows = entry["rows"]
    (dst / "manifest.json").write_text(json.dumps({**manifest, "shards": [entry], "rows_read": rows,
                                                  "rows_written": rows, "rows_rejected": 0,
                                                  "tokens": entry["tokens"]}))
    return dst


def _rewrite_shard(root: Path, table) -> None:
    """Replace shard 0 and record its new checksum in the manifest, as if precompute wrote it."""
    path = root / "shards" / "shard-00000.parquet"
    pq.write_table(table, path)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["shards"][0]["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (root / "manifest.json").write_text(json.dumps(manifest))


def test_missing_manifest(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ShardError, match="run `python pipeline.py precompute"):
        train.run(cfg_for(tmp_path / "empty", tmp_path / "run", max_steps=1))


def test_truncated_shard_is_named(refs, tmp_path):
    root = _copy(refs, tmp_path)
    shard = root / "shards" / "shard-00002.parquet"
    shard.write_bytes(shard.read_bytes()[:200])
    with pytest.raises(ShardError, match="shard-00002.parquet.*checksum"):
        train.run(cfg_for(root, tmp_path / "run", max_steps=20))


def test_missing_shard_is_named(refs, tmp_path):
    root = _copy(refs, tmp_path)
    (root / "shards" / "shard-00001.parquet").unlink()
    with pytest.raises(ShardError, match="shard missing: .*shard-00001.parquet"):
        train.run(cfg_for(root, tmp_path / "run", max_steps=20))


def test_wrong_schema_is_named(refs, tmp_path):
    root = _copy(refs, tmp_path)
    table = pq.read_table(root / "shards" / "shard-00000.parquet").drop_columns(["ref_rejected_logps"])
    _rewrite_shard(root, table)
    with pytest.raises(ShardError, match="shard-00000.parquet: column 'ref_rejected_logps'"):
        train.run(cfg_for(root, tmp_path / "run", max_steps=20))


def test_nan_loss_names_step_and_pairs(refs, tmp_path):
    root = _copy(refs, tmp_path)
    table = pq.read_table(root / "shards" / "shard-00000.parquet")
    col = table.schema.get_field_index("ref_chosen_logps")
    table = table.set_column(col, "ref_chosen_logps", pc.multiply(table.column(col), float("nan")))
    _rewrite_shard(root, table)
    with pytest.raises(TrainingError, match=r"non-finite loss nan at step \d+ .*batch pair ids: [0-9a-f]{12}"):
        train.run(cfg_for(root, tmp_path / "run", max_steps=20))


def test_resume_without_checkpoint_is_an_error(refs, tmp_path):
    with pytest.raises(TrainingError, match="no checkpoint"):
        train.run(cfg_for(refs, tmp_path / "run", max_steps=2, resume="true"))


def fail_at_step_zero(refs, out, monkeypatch) -> None:
    """A run that fails at its first step, after writing its files (config, logs): no checkpoint yet."""
    from stages.core.training import trainer

    def fail(*args):
        raise TrainingError("the machine went away")

    with monkeypatch.context() as m:
        m.setattr(trainer, "train_step", fail)
        with pytest.raises(TrainingError, match="went away"):
            train.run(cfg_for(refs, out, max_steps=1, save_every=1))
    assert (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists()


@pytest.mark.parametrize("resume", ["false", "auto"])
def test_a_run_that_failed_before_its_first_checkpoint_starts_over(refs, tmp_path, monkeypatch, capsys, resume):
    """It left logs and no checkpoint: nothing to lose. A plain re-run and --resume auto start over with
    one notice line; --resume true still says there is no checkpoint."""
    out = tmp_path / "run"
    fail_at_step_zero(refs, out, monkeypatch)
    with pytest.raises(TrainingError, match="--resume: no checkpoint under .*without --resume a run that left none"):
        train.run(cfg_for(refs, out, max_steps=1, resume="true"))
    capsys.readouterr()
    assert train.run(cfg_for(refs, out, max_steps=1, resume=resume))["outcome"] == "finished"
    notices = [line for line in capsys.readouterr().err.splitlines() if line.startswith("train: ")]
    assert notices == [f"train: {out} holds a run that stopped before its first checkpoint: nothing to resume, "
                       "starting over"]
    assert [r["step"] for r in read(str(out / "metrics.jsonl"))] == [1]


def test_existing_run_needs_resume_or_overwrite(refs, tmp_path):
    train.run(cfg_for(refs, tmp_path / "run", max_steps=1, batch_size=2, save_every=1))  # a checkpoint and final/
    with pytest.raises(TrainingError, match="checkpoints: pass --resume to continue it or --overwrite"):
        train.run(cfg_for(refs, tmp_path / "run", max_steps=2))
    shutil.rmtree(tmp_path / "run" / "checkpoints")  # a finished run without checkpoints: its weights are kept
    with pytest.raises(TrainingError, match=r"weights \(final/\) and no checkpoint: pass --overwrite"):
        train.run(cfg_for(refs, tmp_path / "run", max_steps=1))
    train.run(cfg_for(refs, tmp_path / "run", max_steps=1, batch_size=2, overwrite=True))


def test_other_tokenizer_is_refused_other_policy_allowed(refs, tmp_path, tokenizer, capsys):
    root = _copy(refs, tmp_path)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["chat_template_hash"] = "0" * 64
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match="chat_template_hash"):
        train.run(cfg_for(root, tmp_path / "run", max_steps=1))
    other = tmp_path / "other-policy"
    make_tiny_model(tokenizer, seed=9).save_pretrained(other)
    tokenizer.save_pretrained(other)
    train.run(cfg_for(refs, tmp_path / "run2", max_steps=1, model=str(other)))
    assert "policy starts from" in capsys.readouterr().err


def test_eval_refs_logged_under_eval(refs, tmp_path):
    held = first_shard(refs, tmp_path)
    summary = train.run(cfg_for(refs, tmp_path / "run", max_steps=3, batch_size=2, eval_refs=str(held), eval_every=2))
    records = read(str(tmp_path / "run" / "metrics.jsonl"))
    assert [r["step"] for r in records if "eval/loss" in r] == [2, 3]  # every 2 steps, and at the last
    assert records[1]["eval/loss"] > 0 and "eval/rewards/accuracies" in records[1]
    assert summary["eval"]["eval/loss"] == records[-1]["eval/loss"]


def test_bf16_autocast_and_gradient_checkpointing_run(refs, tmp_path):
    train.run(cfg_for(refs, tmp_path / "run", max_steps=2, dtype="bfloat16", gradient_checkpointing=True))
    records = read(str(tmp_path / "run" / "metrics.jsonl"))
    assert all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in records)
    # bf16 moves the policy's log-probs, so step 0 is near, not at, ln 2
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=0.05)


def _pair(prompt: int, chosen: int, rejected: int) -> dict:
    return {"prompt_ids": [1] * prompt, "chosen_ids": [2] * chosen, "rejected_ids": [3] * rejected}


def test_micro_batches_fill_a_token_budget():
    from stages.core.training.policy_pass import PassContext, micro_batches, rounds_for

    ctx = PassContext(2, None, 0, "cpu", "float32", (("sigmoid", 1.0),), None)
    pairs = [_pair(10, 5, 5), _pair(2, 1, 1), _pair(40, 30, 30), _pair(4, 2, 2), _pair(6, 3, 3)]
    # no budget: micro_batch_size pairs each, in the order given
    assert [len(g) for g in micro_batches(pairs, ctx)] == [2, 2, 1]
    # widths (packed: prompt once) 4, 8, 12, 20, 100 sorted; budget 24: 4+8 -> 2 x 8 = 16, + 12 -> 3 x 12 = 36 > 24;
    # 12 and 20 -> 2 x 20 = 40 > 24: alone; 100 is over the budget: alone
    tight = dataclasses.replace(ctx, micro_batch_tokens=24)
    assert [[_length(p) for p in g] for g in micro_batches(pairs, tight)] == [[4, 8], [12], [20], [100]]
    # unpacked: two rows of prompt + the longer answer each (6, 12, 18, 30, 140); budget 54: 3 x 18 fits, 4 x 30 not
    unpacked = dataclasses.replace(tight, pack_prompts=False, micro_batch_tokens=54)
    assert [[_length(p) for p in g] for g in micro_batches(pairs, unpacked)] == [[4, 8, 12], [20], [100]]
    # two workers deal pairs 0, 2, 4 and 1, 3: the first has two micro-batches ([10..20] and [100]), so both run 2
    assert rounds_for(pairs, 2, dataclasses.replace(ctx, micro_batch_tokens=64)) == 2
    assert rounds_for(pairs, 2, ctx) == 2  # ceil(ceil(5 / 2) / 2)


def _length(p: dict) -> int:
    return len(p["prompt_ids"]) + len(p["chosen_ids"]) + len(p["rejected_ids"])


@pytest.mark.slow  # three training runs
def test_micro_batches_by_tokens_train_as_pairs_do(refs, tmp_path):
    """Grouping pairs by a token budget instead of a pair count changes no metric (eval/* included: the held-out
    pass keeps its chunks of micro_batch_size) and no weight beyond rounding: one pair per forward, the whole
    step's slice in one forward, and a budget in between."""
    runs = {}
    for name, kw in {"pairs": dict(micro_batch_size=1), "all": dict(micro_batch_tokens=100_000),
                     "some": dict(micro_batch_tokens=400)}.items():
        train.run(cfg_for(refs, tmp_path / name, max_steps=3, eval_refs=str(refs), **kw))
        runs[name] = untimed(read(str(tmp_path / name / "metrics.jsonl")))
    for name in ("all", "some"):
        for a, b in zip(runs["pairs"], runs[name]):
            assert a.keys() == b.keys()
            assert all(a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6) for k in a), (name, a, b)
    from safetensors.torch import load_file

    w = {n: load_file(next((tmp_path / n / "final").glob("*.safetensors"))) for n in runs}
    for name in ("all", "some"):
        diff = max(float((w["pairs"][k] - w[name][k]).abs().max()) for k in w["pairs"])
        # AdamW divides by sqrt(v) + 1e-8: rounding in near-zero gradients moves a weight by up to ~lr; a lost
        # or doubled pair would move many by about lr (1e-3) each step
        assert diff < 1e-4, (name, diff)


@pytest.mark.slow  # graph capture: ~10 s
def test_compiled_decoder_layers_train_as_eager_ones(refs, tmp_path, monkeypatch):
    """--compile: each decoder layer goes through torch.compile (graph capture of forward, backward and the
    activation-checkpointing recompute, with the packed rows' masks, at varying lengths); the metrics are the
    eager run's. aot_eager keeps the test to seconds: inductor's kernels are what a GPU run adds."""
    import torch._dynamo

    from stages.core.training import trainer

    monkeypatch.setattr(trainer, "COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    runs = {}
    for name, kw in {"eager": {}, "compiled": dict(compile=True)}.items():
        train.run(cfg_for(refs, tmp_path / name, max_steps=2, **kw))
        runs[name] = untimed(read(str(tmp_path / name / "metrics.jsonl")))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # the layers were compiled
    for a, b in zip(runs["eager"], runs["compiled"]):
        assert all(a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6) for k in a), (a, b)
    torch._dynamo.reset()
