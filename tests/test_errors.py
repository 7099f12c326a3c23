"""One user-facing error type: every stage's errors derive from PipelineError, which pipeline.py
prints as `error: ...` with exit code 2, never as a traceback."""

from __future__ import annotations

import pytest
import torch

import pipeline
from stages.core.errors import PipelineError


def test_every_error_class_is_a_pipeline_error():
    from stages.core.config.engine import ConfigError
    from stages.core.inputs.files import DataError
    from stages.core.refs.scoring_run import NotEnoughGpus, ScorerDied
    from stages.core.refs.stream import ShardError
    from stages.core.runtime.models import ModelError
    from stages.core.storage import StorageError
    from stages.core.training.checkpoint import CheckpointError
    from stages.core.training.run_folder import TrainingError
    from stages.precompute import NothingWritten, OutputMismatch
    from stages.submit import SubmitError

    for cls in (CheckpointError, ConfigError, DataError, ModelError, ShardError, StorageError, TrainingError,
                OutputMismatch, SubmitError, NothingWritten, ScorerDied, NotEnoughGpus):
        assert issubclass(cls, PipelineError), cls


@pytest.mark.parametrize("argv,message", [
    (["submit", "no/such/spec.yaml"], "no/such/spec.yaml: cannot read the job spec"),
    (["train", "--batch-size", "0"], "config key 'batch_size': must be positive"),
    (["train", "--config", "no/such/config.yaml"], "no/such/config.yaml: cannot read the config file"),
    (["eval", "--refs", "no/such/refs"], "no manifest.json in no/such/refs"),
    (["precompute", "--limit", "0"], "config key 'limit': --limit 0 reads no input rows; give 1 or more"),
    (["generate", "--limit", "0"], "config key 'limit': --limit 0 reads no prompts; give 1 or more"),
])
def test_errors_print_one_line_and_exit_2(argv, message, capsys):
    assert pipeline.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_a_model_that_is_not_there_is_named(tmp_path):
    from stages.core.runtime.models import ModelError, load_model, load_tokenizer

    with pytest.raises(ModelError, match="cannot load a tokenizer from .*no-model"):
        load_tokenizer(str(tmp_path / "no-model"))
    with pytest.raises(ModelError, match="cannot load a causal LM from .*no-model"):
        load_model(str(tmp_path / "no-model"))


def test_submit_spec_without_entrypoint(tmp_path, capsys):
    spec = tmp_path / "job.yaml"
    spec.write_text("runtime_env: {}\n")
    assert pipeline.main(["submit", str(spec)]) == 2
    assert f"{spec}: a Ray Jobs spec needs an 'entrypoint'" in capsys.readouterr().err


def test_model_paths_are_checked_before_transformers_guesses(tmp_path, tiny_model_dir):
    """A wrong --model is named with what is missing, not with transformers' guesses about repo ids
    or sentencepiece."""
    import shutil

    from stages.core.runtime.models import ModelError, resolve_model

    assert resolve_model(tiny_model_dir) == tiny_model_dir
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"  # a hub id
    with pytest.raises(ModelError, match="model not found: .*runs/x/final is not a model folder here"):
        resolve_model(str(tmp_path / "runs" / "x" / "final"))
    no_tokenizer = tmp_path / "no-tokenizer"
    shutil.copytree(tiny_model_dir, no_tokenizer, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens*",
                                                                                "chat_template*"))
    with pytest.raises(ModelError, match="no-tokenizer has no tokenizer files"):
        resolve_model(str(no_tokenizer))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="empty is not a model folder: no config.json"):
        resolve_model(str(tmp_path / "empty"))


def test_missing_model_on_the_command_line_is_one_line(tmp_path, capsys):
    data = tmp_path / "in.jsonl"
    data.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    assert pipeline.main(["precompute", "--data", str(data), "--model", str(tmp_path / "nope"),
                          "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: model not found") and "Traceback" not in err


@pytest.mark.parametrize("flag,value", [("--learning-rate", "nan"), ("--beta", "inf"), ("--max-grad-norm", "-inf"),
                                        ("--warmup-ratio", "nan")])
def test_non_finite_numbers_are_config_errors(flag, value, capsys):
    assert pipeline.main(["train", f"{flag}={value}"]) == 2
    assert "expected a finite number" in capsys.readouterr().err


def test_ctrl_c_is_one_line_and_exit_130(monkeypatch, capsys):
    def interrupted(argv):
        raise KeyboardInterrupt

    monkeypatch.setitem(pipeline.COMMANDS, "train", interrupted)
    assert pipeline.main(["train"]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "Traceback" not in err and err.count("\n") <= 2


def test_a_hub_error_is_one_line():
    """transformers' hub errors run to many lines; the user gets the first, with the id and the hub named.
    (Built from the error text, not a real hub lookup: tests send nothing off this machine.)"""
    from stages.core.runtime.models import one_line_error

    error = OSError("We couldn't connect to 'https://huggingface.co' to load the files.\nCheck your connection...")
    message = str(one_line_error("no-such-owner/no-such-model", "a tokenizer from", error))
    assert "\n" not in message and "no-such-owner/no-such-model" in message and "Hugging Face hub" in message
    assert "couldn't connect" in message


@pytest.mark.skipif(torch.cuda.device_count() >= 2, reason="this machine has the GPUs --gpus-per-worker 2 asks for")
def test_gpus_per_worker_without_the_gpus_fails_at_once(tmp_path, tiny_model_dir, ray_session, capsys):
    """--gpus-per-worker 2 on a cluster without 2 GPUs on a node: one line naming the flag and what the
    cluster has, before anything is written; no silent fallback to the CPU."""
    data = tmp_path / "in.jsonl"
    data.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    out = tmp_path / "out"
    assert pipeline.main(["precompute", "--data", str(data), "--model", tiny_model_dir, "--output", str(out),
                          "--gpus-per-worker", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --gpus-per-worker 2 needs 2 GPUs of one node") and err.count("\n") == 1
    assert "the Ray cluster has" in err and "Traceback" not in err
    assert not out.exists()


def test_gpu_shortage_names_what_the_cluster_has():
    from stages.core.refs.scoring_run import gpu_shortage

    assert gpu_shortage(2, 1, [2.0]) is None and gpu_shortage(2, 2, [4.0, 0.0]) is None
    assert gpu_shortage(2, 1, []).endswith("the Ray cluster has no GPU (no CUDA device)")
    assert gpu_shortage(2, 1, [0.0]).endswith("the Ray cluster has no GPU (no CUDA device)")
    assert gpu_shortage(2, 1, [1.0, 1.0]).endswith("has 2 GPUs, at most 1 on one node: room for 0")
    assert "for each of the 2 scorers (--num-workers 2)" in gpu_shortage(2, 2, [3.0])


@pytest.mark.skipif(torch.cuda.device_count() >= 2, reason="this machine has 2 CUDA devices")
def test_a_scorer_spread_over_gpus_it_does_not_see_fails(tiny_model_dir):
    from stages.core.runtime.models import ModelError
    from stages.core.scoring.scorer import ReferenceScorer
    from stages.core.scoring.truncation import Truncation

    with pytest.raises(ModelError, match="--gpus-per-worker 2: this process sees [01] CUDA devices"):
        ReferenceScorer(tiny_model_dir, "float32", Truncation(None), gpus=2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("command", ["precompute", "train"])
def test_device_cuda_without_gpus_fails_after_a_bounded_wait(command, tmp_path, tiny_model_dir, refs, ray_session,
                                                             capsys):
    """--device cuda asks Ray for GPUs (scorers, training workers) and, on a cluster that never has
    them, fails after --gpu-wait-seconds with one line: no silent CPU run."""
    import time

    data = tmp_path / "in.jsonl"
    data.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    out = tmp_path / "out"
    argv = (["precompute", "--data", str(data), "--model", tiny_model_dir] if command == "precompute"
            else ["train", "--refs", str(refs), "--max-steps", "1"])
    started = time.monotonic()
    assert pipeline.main([*argv, "--output", str(out), "--device", "cuda", "--gpu-wait-seconds", "0.5",
                          "--progress", "false"]) == 2
    assert time.monotonic() - started < 60
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1
    assert err.startswith("error: --device cuda: ") and "within 0.5s (--gpu-wait-seconds)" in err
    assert "it has 0 GPUs" in err and "--device cpu" in err
    assert not (out / "shards").exists() and not (out / "checkpoints").exists()


def test_device_auto_says_what_it_chose_and_why(ray_session, capsys):
    from stages.core.runtime.devices import pick_device, ray_use_gpu

    assert ray_use_gpu("auto", "2 training worker(s)", 2, 1, 1.0) is torch.cuda.is_available()
    assert pick_device("auto", "evaluation") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert pick_device("cpu") == "cpu" and ray_use_gpu("cpu", "x", 1, 1, 1.0) is False
    err = capsys.readouterr().err.splitlines()
    if not torch.cuda.is_available():
        assert err[0].startswith("device: cpu for 2 training worker(s) (--device auto: the Ray cluster has 0 GPUs now")
        assert err[1] == "device: cpu for evaluation (--device auto: this process sees no CUDA device)"
    assert err[2] == "device: cpu for x (--device cpu)"
