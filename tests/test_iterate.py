"""`pipeline.py iterate`: on-policy rounds end to end with tiny models; a kill in round 2 and the re-run; a
round whose judge fails."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from stages import iterate
from stages.core.config.chain import IterateConfig
from stages.core.config.engine import ConfigError

REWARDS = ROOT / "tests" / "online_rewards.py"
PROMPTS = ["Tell me about rivers.", "Name a colour.", "Why is the sky blue?", "Count to three.", "Say hello."]


def options(out: Path, model: str, **extra) -> list[str]:
    flags = {"--model": model, "--output": str(out), "--rounds": "2", "--num-samples": "3", "--max-new-tokens": "8",
             "--temperature": "1.0", "--progress": "false",
             "--precompute-options": json.dumps({"max_length": 128, "rows_per_shard": 4}),
             "--train-options": json.dumps({"batch_size": 2, "learning_rate": 1e-3}), **extra}
    return [x for k, v in flags.items() for x in (k, v)]


@pytest.mark.slow  # rounds of Ray stages
def test_two_rounds_killed_in_round_two_resume_without_redoing_round_one(tmp_path, tiny_model_dir, refs,
                                                                        ray_session):
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    out = tmp_path / "online"
    flags = options(out, tiny_model_dir, **{"--prompts": str(tmp_path / "prompts.jsonl"), "--eval-refs": str(refs),
                                            "--reward-fn": f"{REWARDS}:chars_then_die",
                                            "--eval-options": json.dumps({"samples": 2})})
    # The judge kills its own process (SIGKILL: no clean-up) in round 2, once round 2's samples are written.
    env = {**os.environ, "RAY_ADDRESS": "", "DPO_TEST_KILL_WHEN": str(out / "round-2" / "candidates" / "manifest.json")}
    killed = subprocess.run([sys.executable, str(ROOT / "pipeline.py"), "iterate", *flags], env=env,
                            capture_output=True, text=True, timeout=900)
    assert killed.returncode == -9, killed.stderr[-3000:]
    state = json.loads((out / "iterate.json").read_text())
    assert set(state["rounds"]["1"]) == {"generate", "judge", "precompute", "train", "eval"}
    assert set(state["rounds"]["2"]) == {"generate"} and not (out / "round-2" / "pairs" / "manifest.json").exists()
    round_one = {p: p.stat().st_mtime_ns for p in (out / "round-1").rglob("*") if p.is_file()}
    refs_after_one = json.loads((out / "refs" / "manifest.json").read_text())

    # Again (in this process), as a nightly job would run it: --new-rounds 1 --rounds 3 finishes round 2 (the
    # round cut off counts as the night's new round) and stops before round 3; round 1 and round 2's samples
    # are kept.
    cfg = IterateConfig(prompts=str(tmp_path / "prompts.jsonl"), model=tiny_model_dir, output=str(out), rounds=3,
                        new_rounds=1,
                        num_samples=3, max_new_tokens=8, temperature=1.0, progress=False, eval_refs=str(refs),
                        reward_fn=f"{REWARDS}:chars", eval_options={"samples": 2},
                        precompute_options={"max_length": 128, "rows_per_shard": 4},
                        train_options={"batch_size": 2, "learning_rate": 1e-3})
    state = iterate.run(cfg)
    assert sorted(state["rounds"]) == ["1", "2"] and "samples" in state["rounds"]["2"]
    assert {p: p.stat().st_mtime_ns for p in (out / "round-1").rglob("*") if p.is_file()} == round_one
    r1, r2 = state["rounds"]["1"], state["rounds"]["2"]
    assert r2["train"]["start"] == r1["train"]["weights"] == str(out / "round-1" / "policy" / "final")
    # --reference initial: round 2's precompute scored round 2's new pairs only, into the same refs
    refs_now = json.loads((out / "refs" / "manifest.json").read_text())
    assert r2["precompute"]["new_pairs"] == r2["judge"]["pairs"] == refs_now["last_run"]["pairs_scored"] > 0
    assert refs_now["rows_written"] == refs_after_one["rows_written"] + r2["judge"]["pairs"]
    assert refs_now["shards"][:len(refs_after_one["shards"])] == refs_after_one["shards"]
    assert refs_now["reference_model"]["path"] == tiny_model_dir
    # round k+1 sampled from round k's policy
    gen2 = json.loads((out / "round-2" / "candidates" / "manifest.json").read_text())
    assert gen2["settings"]["model"] == r1["train"]["weights"] and r2["generate"]["seed"] == 1
    summary = (out / "summary.md").read_text()
    assert "| 0 |" in summary and "| 2 |" in summary and (out / "rounds.png").stat().st_size > 1000
    rows = iterate.table_rows(state)
    assert [r["round"] for r in rows] == [0, 1, 2] and all(r["judge_score"] is not None for r in rows)
    assert all(r["accuracy"] is not None and r["kl"] is not None for r in rows[1:])
    # finished rounds are kept as they are; another reference choice for the same output is refused
    again = iterate.run(IterateConfig(**{**cfg.__dict__, "rounds": 2, "new_rounds": 0}))
    assert again["rounds"] == state["rounds"]
    with pytest.raises(ConfigError, match="--reference initial"):
        iterate.run(IterateConfig(**{**cfg.__dict__, "reference": "previous"}))


def _sampled_round(out: Path, prompts: Path, cands: list[dict]) -> None:
    """An iterate output whose round 1 has its samples: generate recorded as done over hand-made candidates,
    so the round goes on with its judge (no model, no Ray)."""
    from test_online import write_candidates

    write_candidates(out / "round-1" / "candidates", cands)
    state = {"model": "sft-model", "reference": "initial", "prompts": str(prompts),
             "rounds": {"1": {"generate": {"model": "sft-model", "seed": 0, "finished_at": "2025-01-01T00:00:00"}}}}
    (out / "iterate.json").write_text(json.dumps(state))


def test_a_round_whose_judge_fails_says_why(tmp_path, capsys):
    import pipeline

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    (tmp_path / "boom.py").write_text("def boom(prompt, response):\n    raise ValueError('boom')\n")
    # every answer fails: the judge's own error, with the first exception, ends the run
    _sampled_round(tmp_path / "a", prompts, [{"prompt": p, "responses": ["x", "yy"]} for p in PROMPTS[:2]])
    flags = ["iterate", "--prompts", str(prompts), "--model", "sft-model", "--rounds", "1", "--progress", "false"]
    rc = pipeline.main([*flags, "--output", str(tmp_path / "a"), "--reward-fn", f"{tmp_path / 'boom.py'}:boom"])
    err = capsys.readouterr().err
    assert rc == 2 and "every one of 4 answers failed: judge_error x4" in err and "ValueError('boom')" in err, err
    # some answers fail and no pair is left: the round's error names the first failure too
    _sampled_round(tmp_path / "b", prompts, [{"prompt": "P", "responses": ["abc", "zz"]}])
    rc = pipeline.main([*flags, "--output", str(tmp_path / "b"), "--reward-fn", f"{REWARDS}:picky"])
    err = capsys.readouterr().err
    assert rc == 2 and "no pairs" in err and "ValueError(\"no a's up front\")" in err, err


def test_a_judge_or_held_out_refs_that_cannot_work_stop_iterate_before_round_one(tmp_path):
    from stages.core.inputs.files import DataError

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    base = dict(prompts=str(prompts), model="sft-model", output=str(tmp_path / "online"), rounds=1, progress=False)
    # each would otherwise be found only after a round of sampling (and, for --eval-refs, training)
    with pytest.raises(ConfigError, match="has no function 'nope'"):
        iterate.run(IterateConfig(**base, reward_fn=f"{REWARDS}:nope"))
    with pytest.raises(DataError, match=r"--eval-refs .*nothere: no manifest\.json"):
        iterate.run(IterateConfig(**base, reward_fn=f"{REWARDS}:chars", eval_refs=str(tmp_path / "nothere")))
    assert not (tmp_path / "online").exists()


def test_a_bad_stage_option_stops_iterate_before_anything_is_written(tmp_path, capsys):
    """Every stage's options are built into its config before round 1: a typo in --train-options is one
    line naming the key, exit 2, and no OUTPUT (not a round of sampling, judging and scoring later)."""
    import pipeline

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    out = tmp_path / "online"
    rc = pipeline.main(["iterate", "--prompts", str(prompts), "--model", "sft-model", "--output", str(out),
                        "--reward-fn", f"{REWARDS}:chars", "--progress", "false",
                        "--train-options", '{"learnign_rate": 1e-5}'])
    err = capsys.readouterr().err
    assert rc == 2 and "learnign_rate" in err and "train_options" in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert not out.exists() or not any(out.iterdir())
    with pytest.raises(ConfigError, match="'judge_options': candidates are set by iterate itself"):
        iterate.run(IterateConfig(prompts=str(prompts), model="sft-model", output=str(out),
                                  reward_fn=f"{REWARDS}:chars", judge_options={"candidates": "elsewhere"}))
    assert not out.exists()


def test_iterate_json_keeps_its_layout():
    """iterate.json written by an older version reads into the state types and back unchanged (resumable)."""
    from stages.core.online.rounds import IterateState

    old = {"model": "m", "reference": "initial", "prompts": "p",
           "rounds": {"1": {"generate": {"seed": 0, "finished_at": "t"}, "train": {"weights": "w", "finished_at": "t"},
                            "samples": {"generate": {"finished_at": "t"}}},
                      "2": {"generate": {"finished_at": "t"}}}, "finished_at": "t"}
    state = IterateState.from_json(old)
    assert state.round(1).get("train")["weights"] == "w" and state.round(1).samples.get("generate")
    assert state.to_json() == old
    again = state.round(1).with_stage("generate", {"finished_at": "u"})
    assert set(again.stages) == {"generate"} and again.samples == state.round(1).samples  # later stages are stale
