"""KTO on unpaired shards: the trainer's step takes the KL estimate over the whole optimizer batch and
every worker before the loss pass; the first step's values at policy == reference are known in closed
form; two workers reproduce one; a pair loss on unpaired shards (and KTO on pairs) is refused by name."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from test_parallel import assert_same_run, spawn_train
from test_precompute_unpaired import examples

from stages import evaluate, precompute, train
from stages.core.config.engine import ConfigError
from stages.core.config.options import EvalConfig, PrecomputeConfig, TrainConfig
from stages.core.training.metrics import read

WEIGHTS = dict(desirable_weight=1.0, undesirable_weight=2.5)


@pytest.fixture(scope="module")
def unpaired_refs(tmp_path_factory, tiny_model_dir, ray_session):
    root = tmp_path_factory.mktemp("kto")
    (root / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in examples(16)))
    precompute.run(PrecomputeConfig(data=str(root / "in.jsonl"), model=tiny_model_dir, output=str(root / "refs"),
                                    rows_per_shard=8, max_length=256, progress=False))
    return root / "refs"


def kto_cfg(refs, out, **kw) -> TrainConfig:
    base = dict(refs=str(refs), output=str(out), loss_type="kto", batch_size=8, micro_batch_size=2,
                learning_rate=1e-3, shuffle_buffer=8, progress=False, seed=1, max_steps=4, warmup_ratio=0.0,
                **WEIGHTS)
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def kto_run(unpaired_refs, tmp_path_factory) -> Path:
    """One worker, 4 steps: the run test_kto_step_zero_then_learning reads and two workers must reproduce."""
    out = tmp_path_factory.mktemp("kto-run") / "run"
    train.run(kto_cfg(unpaired_refs, out))
    return out


@pytest.mark.slow  # a precompute (Ray) and a training run
def test_kto_step_zero_then_learning(unpaired_refs, kto_run, tmp_path):
    records = read(str(kto_run / "metrics.jsonl"))
    first, last = records[0], records[-1]
    d, u = first["count/desirable"], first["count/undesirable"]
    assert d + u == 8 and d > 0 and u > 0
    # policy == reference at step 0: every log-ratio and the KL estimate are 0, so each example's loss is
    # half its weight, and the batch loss half the weighted mean of the weights.
    assert first["loss"] == pytest.approx(0.5 * (d * 1.0 + u * 2.5) / (d + u), abs=1e-6)
    assert abs(first["kl"]) < 1e-6 and abs(first["rewards/chosen"]) < 1e-6 and abs(first["rewards/rejected"]) < 1e-6
    assert {"loss", "kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen",
            "logps/rejected", "count/desirable", "count/undesirable"} <= set(first)
    assert last["rewards/margins"] > 0.05  # desirable completions rose above undesirable ones
    assert any(r["kl"] > 0 for r in records[1:])

    results = evaluate.run(EvalConfig(refs=str(unpaired_refs), model=str(kto_run / "final"),
                                      output=str(tmp_path / "eval")))
    ref = results["reference"]
    n_d, n_u = ref["eval/count/desirable"], ref["eval/count/undesirable"]
    assert ref["eval/loss"] == pytest.approx(0.5 * (n_d + 2.5 * n_u) / (n_d + n_u), abs=1e-9)  # weights from the run
    assert results["eval/rewards/margins"] > 0 and results["eval/loss"] < ref["eval/loss"]

    from stages.core.refs.stream import load_refs
    from stages.inspect_refs import report

    text, info = report(load_refs(str(unpaired_refs)), examples=1)
    assert f"{info['desirable']} desirable, {info['undesirable']} undesirable" in text and "--- example" in text
    # a pair loss on the real unpaired shards (test_a_loss_of_the_other_kind_is_refused_by_name: the manifest)
    with pytest.raises(ConfigError, match="loss 'sigmoid' takes preference pairs, and the shards hold unpaired"):
        train.run(kto_cfg(unpaired_refs, tmp_path / "a", loss_type="sigmoid"))


@pytest.mark.slow  # two spawned processes
def test_two_kto_workers_reproduce_one(unpaired_refs, kto_run, tmp_path):
    spawn_train(kto_cfg(unpaired_refs, tmp_path / "two"), 2)
    assert_same_run(kto_run, tmp_path / "two", keys=("loss", "kl", "rewards/margins", "grad_norm"))


def test_a_loss_of_the_other_kind_is_refused_by_name(refs, tmp_path):
    """Refused from the manifest's kind, before a step: here a copy of the paired refs whose manifest says
    unpaired (no precompute in the fast tests; the real unpaired shards: test_kto_step_zero_then_learning)."""
    unpaired = tmp_path / "unpaired-refs"
    shutil.copytree(refs, unpaired)
    manifest = json.loads((unpaired / "manifest.json").read_text())
    (unpaired / "manifest.json").write_text(json.dumps({**manifest, "kind": "unpaired"}))
    with pytest.raises(ConfigError, match="loss 'sigmoid' takes preference pairs, and the shards hold unpaired"):
        train.run(kto_cfg(unpaired, tmp_path / "a", loss_type="sigmoid"))
    with pytest.raises(ConfigError, match="loss 'kto' takes unpaired examples .* the shards hold paired"):
        train.run(kto_cfg(refs, tmp_path / "b"))
    with pytest.raises(ConfigError, match="cannot be combined"):
        TrainConfig(loss_type="kto,sft")
