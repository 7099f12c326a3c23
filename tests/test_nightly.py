"""`pipeline.py run`: the nightly chain in one process. Night after night the precompute scores only
the rows added since, training goes to a new dated folder, and a retried night repeats nothing."""

from __future__ import annotations

import json

import pytest
from conftest import HH_SAMPLE, read_jsonl_gz

import pipeline
from stages.core import storage
from stages.core.config.chain import RunConfig
from stages.core.config.engine import ConfigError


def rows(n):
    found = [r for r in read_jsonl_gz(HH_SAMPLE, 200) if r["chosen"] != r["rejected"] and len(r["chosen"]) < 600]
    return found[:n]


def write(path, some):
    path.write_text("".join(json.dumps(r) + "\n" for r in some))


@pytest.mark.slow  # three nights of Ray precompute, training and eval
def test_two_nights_a_refused_duplicate_and_a_rerun(tmp_path, tiny_model_dir, refs, capsys):
    data, held = tmp_path / "prefs.jsonl", refs  # the held-out refs: conftest's 20 pairs
    config = tmp_path / "nightly.yaml"  # stage options as YAML mappings
    config.write_text(f"data: {data}\nmodel: {tiny_model_dir}\nrefs: {tmp_path / 'refs'}\nruns: {tmp_path / 'runs'}\n"
                      "precompute_options: {format: hh, rows_per_shard: 5}\n"
                      "train_options: {max_steps: 2, batch_size: 4, learning_rate: 1.0e-3}\n")
    night = ["run", "--config", str(config), "--progress", "false"]

    write(data, rows(10))
    assert pipeline.main([*night, "--date", "2026-11-24"]) == 0
    first = json.loads((tmp_path / "runs" / "nightly-2026-11-24" / "run.json").read_text())
    assert first["stages"]["precompute"]["last_run"]["pairs_written"] == 10
    assert first["stages"]["train"]["outcome"] == "finished" and "eval" not in first["stages"]

    write(data, rows(16))  # six rows arrive during the day
    capsys.readouterr()
    # This night with the progress bar on, its default: the chain of pairs with the bar (moved here from
    # test_progress, whose own chain of pairs was three more stage runs).
    assert night[-2:] == ["--progress", "false"]
    assert pipeline.main([*night[:-2], "--date", "2026-11-25", "--eval-refs", str(held)]) == 0
    out, err = capsys.readouterr()
    assert "pair/s" in err and "acc " in err  # precompute's bar and train's
    assert "rows read 16, written 16" in out and "6 pairs written" in out and "held-out pairs" in out
    assert "precompute 6 new pairs, 16 in all" in out and "eval/rewards/accuracies" in out.splitlines()[-1]
    second_dir = tmp_path / "runs" / "nightly-2026-11-25"
    second = json.loads((second_dir / "run.json").read_text())
    assert second["stages"]["precompute"]["last_run"]["pairs_written"] == 6  # only the new rows were scored
    assert second["stages"]["precompute"]["rows_written"] == 16
    assert (second_dir / "final" / "model.safetensors").exists() and (second_dir / "eval" / "eval.json").exists()
    assert second["stages"]["eval"]["pairs"] == 20 and "eval/rewards/accuracies" in second["stages"]["eval"]
    assert "run: " + str(second_dir) in out and "new pairs" in out
    assert json.loads((tmp_path / "runs" / "latest.json").read_text())["run"] == str(second_dir)
    assert (tmp_path / "runs" / "nightly-2026-11-24" / "final").exists()  # the first night's run is kept

    metrics = (second_dir / "metrics.jsonl").read_text()
    refs_manifest = (tmp_path / "refs" / "manifest.json").read_text()
    write(data, rows(18))  # more rows: a duplicate of a finished night must not score them
    capsys.readouterr()
    assert pipeline.main([*night, "--date", "2026-11-25", "--eval-refs", str(held)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "finished at" in err and "--rerun" in err
    assert (tmp_path / "refs" / "manifest.json").read_text() == refs_manifest  # nothing scored
    write(data, rows(16))
    # --rerun: the night again, as a retried job would go on; it repeats nothing either
    assert pipeline.main([*night, "--date", "2026-11-25", "--eval-refs", str(held), "--rerun"]) == 0
    assert "train already finished on these refs" in capsys.readouterr().err
    assert (second_dir / "metrics.jsonl").read_text() == metrics  # a retried night repeats no training
    again = json.loads((second_dir / "run.json").read_text())
    assert again["stages"]["precompute"]["last_run"]["pairs_written"] == 0 and again["stages"]["eval"]


def test_stage_options_cannot_take_the_chains_own_keys(tmp_path):
    from stages.nightly import stage_configs

    cfg = RunConfig(train_options={"output": "elsewhere", "beta": 0.2})
    with pytest.raises(ConfigError, match="'train_options': output are set by the chain itself"):
        stage_configs(cfg, "runs/x")
    cfg = RunConfig(train_options={"beta": 0.2}, precompute_options={"num_workers": 3}, num_workers=2,
                    device="cpu", dtype="bfloat16")
    pre, train, ev = stage_configs(cfg, "runs/x")
    assert (pre.num_workers, train.num_workers, train.beta, train.resume, train.output) == (3, 2, 0.2, "auto", "runs/x")
    assert pre.device == train.device == "cpu" and pre.dtype == train.dtype == "bfloat16" and ev is None
    with pytest.raises(ConfigError, match="'train_options': unknown key"):
        stage_configs(RunConfig(train_options={"betta": 1}), "runs/x")


@pytest.mark.parametrize("key,value,message", [
    ("date", "26/11/2026", "expected YYYY-MM-DD"), ("run_name", "a/{date}", "must name one folder"),
    ("run_name", "{day}", "may use only {date}"), ("eval_options", "[1]", "expected a mapping")])
def test_bad_run_settings_name_the_key(key, value, message):
    with pytest.raises(ConfigError, match=f"config key '{key}'.*{message}"):
        RunConfig(**{key: value})


def test_the_run_folder_is_dated_by_the_program():
    from datetime import datetime, timezone

    from stages.nightly import run_dir

    today = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    assert run_dir(RunConfig(runs="s3://b/runs")) in (f"s3://b/runs/nightly-{today}",)
    assert run_dir(RunConfig(runs="r", run_name="dpo-{date}", date="2026-01-02")) == storage.join("r", "dpo-2026-01-02")


def test_a_second_chain_is_refused_while_one_runs(tmp_path, capsys):
    """The chain holds a lease on RUNS: a duplicated tick or a hand-started night exits 2 naming the
    running one, before anything is read or scored."""
    from stages.core.lease import Lease

    runs, refs = tmp_path / "runs", tmp_path / "refs"
    with Lease(str(runs), "run") as running:
        assert pipeline.main(["run", "--data", str(tmp_path / "absent.jsonl"), "--runs", str(runs), "--refs",
                              str(refs), "--progress", "false"]) == 2
    err = capsys.readouterr().err
    assert "being written by another run (run on" in err and running.run_id[:12] in err
    assert not refs.exists()
