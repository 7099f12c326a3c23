"""Evaluation, side-by-side samples, early stopping, the beta sweep and `inspect`, on a tiny model."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

from stages import evaluate, sweep, train
from stages.core.config.engine import ConfigError, parse_args
from stages.core.config.options import EvalConfig, SweepConfig, TrainConfig
from stages.core.training import trainer
from stages.core.training.metrics import read


def test_eval_of_the_reference_is_zero(refs, tmp_path):
    res = evaluate.run(EvalConfig(refs=str(refs), output=str(tmp_path / "ev"), progress=False))
    for key in ("eval/rewards/chosen", "eval/rewards/rejected", "eval/rewards/margins", "eval/logratio/chosen",
                "eval/logratio/rejected", "eval/logratio_per_token/chosen"):
        assert abs(res[key]) < 1e-5, key
    assert res["eval/rewards/accuracies"] == 0.0  # strict chosen > rejected: ties are not wins
    assert res["eval/loss"] == pytest.approx(0.693147, abs=1e-5)
    saved = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert saved["pairs"] == 20 and saved["eval/rewards/accuracies"] == 0.0
    assert "| preference accuracy |" in evaluate.table(res)


@pytest.mark.slow
def test_eval_after_training_rises_and_kl_is_positive(refs, tmp_path_factory):
    from test_train import trained_run

    run = trained_run(refs, tmp_path_factory)  # 4 epochs on the pairs evaluated here, in a folder named "run"
    res = evaluate.run(EvalConfig(refs=str(refs), model=str(run / "final"), progress=False, samples=2,
                                  max_new_tokens=8))
    assert res["eval/rewards/accuracies"] > 0.6 and res["eval/rewards/margins"] > 0
    assert res["eval/logratio/chosen"] > 0 and res["eval/logratio_per_token/chosen"] > 0
    # A KL estimated from pure policy samples; it is >= 0 in expectation (2 samples here: just finite)
    assert res["kl_samples"] == 2 and math.isfinite(res["eval/kl_sampled"])
    # The run's own loss settings were read from its train_config.yaml (beta 0.1, sigmoid)
    assert res["loss_settings_from"].endswith("run/train_config.yaml")
    base = res["reference"]
    assert base["eval/rewards/accuracies"] == 0 and base["eval/rewards/margins"] == 0
    assert base["eval/loss"] == pytest.approx(math.log(2))
    assert "| preference accuracy | 0.0000 |" in evaluate.table(res)
    out = run / "final" / "eval"
    rows = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all({"prompt", "chosen", "reference", "policy"} <= r.keys() for r in rows)
    md = (out / "samples.md").read_text()
    assert md.count("**Reference**") == 2 and md.count("**Policy**") == 2


def test_early_stopping_keeps_the_best(refs, tmp_path, monkeypatch):
    crafted = iter([0.70, 0.60, 0.65, 0.64, 0.50, 0.40])  # best at step 2, then 2 evals without improvement

    def fake_evaluate(model, refs_, ctx, rank=0, world=1, reduce=None):
        return {"eval/loss": next(crafted), "eval/rewards/accuracies": 0.5}

    monkeypatch.setattr(trainer, "heldout_metrics", fake_evaluate)
    cfg = TrainConfig(refs=str(refs), output=str(tmp_path / "run"), max_steps=6, batch_size=2, micro_batch_size=2,
                      learning_rate=1e-3, eval_refs=str(refs), eval_every=1, early_stopping_patience=2,
                      save_every=2, keep_checkpoints=10, progress=False)  # the checkpoints read: steps 2 and 4
    summary = train.run(cfg)
    assert summary["steps"] == 4 and summary["best_step"] == 2 and summary["outcome"] == "early_stopped"
    assert summary["weights"] == str(tmp_path / "run" / "best")
    text = train.summary_text(summary)
    assert text.startswith("train: early stop at step 4") and f"-> {tmp_path / 'run' / 'best'}," in text
    assert [r["step"] for r in read(str(tmp_path / "run" / "metrics.jsonl"))] == [1, 2, 3, 4]
    from safetensors.torch import load_file

    from stages.core.training.checkpoint import load_policy_model

    best = load_file(tmp_path / "run" / "best" / "model.safetensors")
    at2 = load_policy_model(str(tmp_path / "run" / "checkpoints" / "step-2")).state_dict()
    at4 = load_policy_model(str(tmp_path / "run" / "checkpoints" / "step-4")).state_dict()
    assert all(torch.equal(best[k], at2[k]) for k in best)
    assert not all(torch.equal(best[k], at4[k]) for k in best)
    assert json.loads((tmp_path / "run" / "best" / "best.json").read_text())["step"] == 2
    with pytest.raises(ConfigError, match="early_stopping_patience.*eval_refs"):
        parse_args(TrainConfig, ["--early-stopping-patience", "2"], prog="t")


@pytest.mark.slow  # two training runs and their evaluations
def test_sweep_two_betas(refs, tmp_path):
    rows = sweep.run(SweepConfig(refs=str(refs), eval_refs=str(refs), beta=[0.1, 0.5], output=str(tmp_path / "sw"),
                                 max_steps=2, batch_size=4, learning_rate=1e-3, progress=False))
    assert [r["beta"] for r in rows] == [0.1, 0.5]
    assert (tmp_path / "sw" / "sweep.png").stat().st_size > 1000
    table = (tmp_path / "sw" / "sweep.md").read_text()
    assert table.count("\n") == 4 and "| 0.5 |" in table
    assert json.loads((tmp_path / "sw" / "sweep.json").read_text())[1]["beta"] == 0.5
    assert (tmp_path / "sw" / "beta-0.1" / "final" / "model.safetensors").exists()


@pytest.mark.slow
def test_inspect_counts_match_the_manifest(refs, tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "pipeline.py"), "inspect", str(refs), "--output", str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((refs / "manifest.json").read_text())
    assert (f"rows read {manifest['rows_read']}, written {manifest['rows_written']}, "
            f"rejected {manifest['rows_rejected']}, {len(manifest['shards'])} shards") in proc.stdout
    assert "ref_margin" in proc.stdout and "--- pair" in proc.stdout
    assert (tmp_path / "ref_margins.png").stat().st_size > 1000


def test_eval_streams_the_heldout_set(refs, tmp_path, monkeypatch):
    """One micro-batch of pairs is read ahead of the forward that uses it, never the whole set."""
    from stages.core.training import policy_pass

    pulled, seen = [0], []
    real_pairs, real_run = policy_pass.epoch_pairs, policy_pass.run_pairs

    def counting_pairs(*args, **kwargs):
        for p in real_pairs(*args, **kwargs):
            pulled[0] += 1
            yield p

    def spying_run(model, pairs, *args, **kwargs):
        seen.append(pulled[0])
        return real_run(model, pairs, *args, **kwargs)

    monkeypatch.setattr(policy_pass, "epoch_pairs", counting_pairs)
    monkeypatch.setattr(policy_pass, "run_pairs", spying_run)
    res = evaluate.run(EvalConfig(refs=str(refs), output=str(tmp_path / "ev"), micro_batch_size=4, progress=False))
    assert seen == [4, 8, 12, 16, 20] and res["pairs"] == 20


def test_eval_scores_with_the_runs_loss_settings_unless_told(refs, tmp_path):
    """A run trained with beta 0.5 and IPO is evaluated with them; an explicit --beta wins."""
    from test_train import first_shard

    train.run(TrainConfig(refs=str(refs), output=str(tmp_path / "run"), max_steps=1, batch_size=2,
                          micro_batch_size=2, beta=0.5, loss_type="ipo", progress=False))
    model = str(tmp_path / "run" / "final")
    held = first_shard(refs, tmp_path)  # 5 of the pairs: their number proves nothing here
    res = evaluate.run(EvalConfig(refs=str(held), model=model, output=str(tmp_path / "ev"), progress=False))
    assert (res["config"]["beta"], res["config"]["loss_type"]) == (0.5, "ipo")
    # rewards are beta * log-ratio: the run's beta scales them
    assert res["eval/rewards/chosen"] == pytest.approx(0.5 * res["eval/logratio/chosen"], rel=1e-9)
    told = evaluate.run(EvalConfig(refs=str(held), model=model, output=str(tmp_path / "ev2"), beta=0.2,
                                   progress=False))
    assert (told["config"]["beta"], told["config"]["loss_type"]) == (0.2, "ipo")
    assert told["eval/rewards/chosen"] == pytest.approx(0.2 * told["eval/logratio/chosen"], rel=1e-9)


def test_samples_md_renders_conversational_prompts_as_turns(tokenizer):
    """A chat-template prompt reads as one paragraph per turn, led by its role in bold, not as bare role
    lines; a plain-text prompt (HH without a template) is quoted as it is."""
    messages = [{"role": "user", "content": "Hi there\nsecond line"}, {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "More?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    turns = evaluate.prompt_turns(tokenizer, ids)
    assert [t["role"] for t in turns] == ["system", "user", "assistant", "user"]  # SmolLM2's default system turn
    assert turns[1:] == messages
    plain = tokenizer("\n\nHuman: Hi\n\nAssistant:")["input_ids"]
    assert evaluate.prompt_turns(tokenizer, plain) is None

    row = {"pair_id": "0" * 16, "prompt": tokenizer.decode(ids, skip_special_tokens=True), "turns": turns,
           "chosen": "Sure.", "reference": "Ok", "policy": "Yes"}
    md = evaluate.samples_markdown([row, {**row, "turns": None, "prompt": "Human: Hi", "label": False}],
                                   EvalConfig(model="m"))
    assert "> **user:** Hi there\n> second line\n>\n> **assistant:** Hello\n>\n> **user:** More?\n" in md
    assert "\n> user\n" not in md and "\n> system\n" not in md
    assert "> Human: Hi" in md and "## 2. example `" in md and "**Completion (data, undesirable)**" in md
