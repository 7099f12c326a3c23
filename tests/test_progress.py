"""Every command's progress bar and summary hold for both kinds of shards: preference pairs and unpaired
(KTO) examples, read as such or made from pairs by --unpair. The commands run as a user runs them
(`pipeline.main`, in-process) with the progress bar on, its default; and the console says what it is
doing (the install, the wait before the first training step) without noise (the device line)."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess

import pytest
import torch
from conftest import HH_SAMPLE, ROOT, read_jsonl_gz
from test_precompute_unpaired import examples

import pipeline


def cli(*argv) -> tuple[int, str, str]:
    """One command through the CLI, as a user types it -> (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = pipeline.main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def ok(result: tuple[int, str, str]) -> tuple[str, str]:
    code, out, err = result
    assert code == 0 and "Traceback" not in err, err[-2000:]
    return out, err


def write(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def pairs(n: int) -> list[dict]:
    return [r for r in read_jsonl_gz(HH_SAMPLE, 200) if r["chosen"] != r["rejected"] and len(r["chosen"]) < 600][:n]


@pytest.fixture(scope="module")
def kto(tmp_path_factory, tiny_model_dir, ray_session) -> dict:
    """README's "KTO on unpaired feedback" as written, with the tiny model (--model) and one held-out
    sample: precompute (training and held-out feedback), train, eval; each step's (stdout, stderr)."""
    root = tmp_path_factory.mktemp("kto-walkthrough")
    feedback, heldout = write(root / "feedback.jsonl", examples(16)), write(root / "heldout.jsonl", examples(24)[16:])
    steps = {"root": root}
    steps["precompute"] = ok(cli("precompute", "--data", feedback, "--model", tiny_model_dir,
                                 "--output", root / "kto-refs"))
    steps["heldout"] = ok(cli("precompute", "--data", heldout, "--model", tiny_model_dir,
                              "--output", root / "kto-heldout-refs"))
    steps["train"] = ok(cli("train", "--refs", root / "kto-refs", "--loss-type", "kto", "--beta", "0.1",
                            "--desirable-weight", "1.0", "--undesirable-weight", "1.0", "--output", root / "kto"))
    steps["eval"] = ok(cli("eval", "--refs", root / "kto-heldout-refs", "--model", root / "kto" / "final",
                           "--samples", "1", "--max-new-tokens", "4"))
    return steps


@pytest.mark.slow
def test_the_kto_walkthrough_runs_with_the_bar(kto):
    out, err = kto["precompute"]
    assert "reference log-probs" in err and "example/s" in err and "examples/s" in err and "pair/s" not in err
    assert "rows read 16, written 16" in out and "16 examples written" in out and "pairs" not in out

    out, err = kto["train"]
    assert "train: loading the policy" in err and "train (first step: reading shards" in err
    assert "2/2" in err and "kl " in err and "acc " not in err  # the bar: KTO's figures, no accuracy
    assert ("\n" + out).count("\ntrain: 2 steps -> ") == 1 and "\n  kl  " in out and "rewards/accuracies" not in out

    out, _ = kto["eval"]
    assert "eval: 8 held-out examples" in out and "| KL estimate, mismatched completions (KTO) |" in out
    assert "| reward desirable |" in out and "| mean margin (desirable - undesirable) |" in out
    assert "| desirable examples | 6 | 6 |" in out  # counts, as counts
    md = (kto["root"] / "kto" / "final" / "eval" / "samples.md").read_text()
    assert "## 1. example `" in md and ("**Completion (data, desirable)**" in md
                                        or "**Completion (data, undesirable)**" in md)


@pytest.mark.slow
def test_sweep_tables_for_pairs_and_for_examples(kto, refs, tmp_path):
    root = kto["root"]
    out, err = ok(cli("sweep", "--refs", root / "kto-refs", "--eval-refs", root / "kto-heldout-refs", "--beta", "0.1",
                      "--loss-type", "kto", "--max-steps", "1", "--output", tmp_path / "kto-sweep"))
    assert "| beta | eval margin | eval reward desirable | eval reward undesirable | eval KL estimate |" in out
    assert "nan" not in out and "1/1" in err
    assert (tmp_path / "kto-sweep" / "sweep.png").stat().st_size > 1000
    assert json.loads((tmp_path / "kto-sweep" / "sweep.json").read_text())[0]["kind"] == "unpaired"

    out, err = ok(cli("sweep", "--refs", refs, "--eval-refs", refs, "--beta", "0.1", "--max-steps", "1",
                      "--batch-size", "4", "--output", tmp_path / "sweep"))
    assert "| beta | eval accuracy | eval margin |" in out and "nan" not in out and "acc " in err
    assert (tmp_path / "sweep" / "sweep.png").stat().st_size > 1000


def nightly(tmp_path, tiny_model_dir, data, eval_refs, precompute: dict, train: dict) -> tuple[str, str]:
    return ok(cli("run", "--data", data, "--model", tiny_model_dir, "--refs", tmp_path / "refs", "--runs",
                  tmp_path / "runs", "--date", "2026-12-01", "--eval-refs", eval_refs,
                  "--precompute-options", json.dumps({"rows_per_shard": 4, **precompute}),
                  "--train-options", json.dumps({"max_steps": 2, "batch_size": 4, **train})))


# The nightly chain of pairs with the bar (pair/s, acc, rows read and pairs written, the chain's summary):
# test_nightly's second night runs with the bar on and checks it there (a chain of its own here was three
# more stage runs).


@pytest.mark.slow
def test_unpaired_pairs_are_counted_as_rows_read_and_examples_made(kto, tmp_path, tiny_model_dir):
    """--unpair on 6 pairs, one of them no usable pair: 6 rows read, 10 examples and a reject."""
    rows = pairs(5) + [{"chosen": "\n\nHuman: Hi\n\nAssistant: Hello", "rejected": "\n\nHuman: Hi\n\nAssistant: Hello"}]
    out, err = nightly(tmp_path, tiny_model_dir, write(tmp_path / "prefs.jsonl", rows),
                       kto["root"] / "kto-heldout-refs", {"format": "hh", "unpair": True}, {"loss_type": "kto"})
    assert "example/s" in err and "kl " in err and "pair/s" not in err
    assert "rows read 6 (--unpair: 10 examples, 1 row rejected whole), written 10, rejected 1" in out
    assert "10 examples written" in out and "eval: 8 held-out examples" in out
    assert "precompute 10 new examples, 10 in all" in out and "eval/kl" in out.splitlines()[-1]
    manifest = json.loads((tmp_path / "refs" / "manifest.json").read_text())
    assert manifest["input_rows_read"] == 6 and manifest["rows_read"] == 11  # = rows_written 10 + rows_rejected 1


def test_the_device_line_has_the_autoscaling_hint_only_where_it_applies(ray_session, monkeypatch, capsys):
    from stages.core.runtime.devices import ray_use_gpu

    if torch.cuda.is_available():
        pytest.skip("the hint is about a cluster without the GPUs asked for")
    ray_use_gpu("auto", "training", 1, 1, 1.0)  # a local Ray on a machine without a GPU: nothing to scale
    line = capsys.readouterr().err.strip()
    assert line == "device: cpu for training (--device auto: the Ray cluster has 0 GPUs now, 1 needed)"
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")  # a cluster joined: an autoscaler may add GPU nodes
    ray_use_gpu("auto", "training", 1, 1, 1.0)
    assert "autoscaling cluster adds GPU nodes only for --device cuda" in capsys.readouterr().err


def test_the_install_says_what_it_is_doing(tmp_path):
    """pip runs with -q for minutes: every install step is announced first (make -n shows the recipe)."""
    recipe = subprocess.run(["make", "-n", "-B", "install", f"VENV={tmp_path / 'venv'}"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.splitlines()
    installs = [i for i, line in enumerate(recipe) if " pip install" in line or " -m venv " in line]  # pip or uv
    assert len(installs) == 5
    for i in installs:
        assert recipe[i - 1].startswith("echo ") and recipe[i - 1].rstrip('"').endswith("...")
    assert any("torch 2.13.0" in line for line in recipe if line.startswith("echo "))
