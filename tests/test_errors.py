"""One user-facing error type: every stage's errors derive from PipelineError, which pipeline.py
prints as `error: ...` with exit code 2, never as a traceback."""

from __future__ import annotations

import pytest

import pipeline
from stages.core.errors import PipelineError


def test_every_error_class_is_a_pipeline_error():
    from stages.core.checkpoint import CheckpointError
    from stages.core.config import ConfigError
    from stages.core.data import DataError
    from stages.core.models import ModelError
    from stages.core.shard_stream import ShardError
    from stages.core.storage import StorageError
    from stages.core.trainer import TrainingError
    from stages.precompute import OutputMismatch
    from stages.submit import SubmitError

    for cls in (CheckpointError, ConfigError, DataError, ModelError, ShardError, StorageError, TrainingError,
                OutputMismatch, SubmitError):
        assert issubclass(cls, PipelineError), cls


@pytest.mark.parametrize("argv,message", [
    (["submit", "no/such/spec.yaml"], "no/such/spec.yaml: cannot read the job spec"),
    (["train", "--batch-size", "0"], "config key 'batch_size': must be positive"),
    (["train", "--config", "no/such/config.yaml"], "no/such/config.yaml: cannot read the config file"),
    (["eval", "--refs", "no/such/refs"], "no manifest.json in no/such/refs"),
])
def test_errors_print_one_line_and_exit_2(argv, message, capsys):
    assert pipeline.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_a_model_that_is_not_there_is_named(tmp_path):
    from stages.core.models import ModelError, load_model, load_tokenizer

    with pytest.raises(ModelError, match="cannot load a tokenizer from .*no-model"):
        load_tokenizer(str(tmp_path / "no-model"))
    with pytest.raises(ModelError, match="cannot load a causal LM from .*no-model"):
        load_model(str(tmp_path / "no-model"))


def test_submit_spec_without_entrypoint(tmp_path, capsys):
    spec = tmp_path / "job.yaml"
    spec.write_text("runtime_env: {}\n")
    assert pipeline.main(["submit", str(spec)]) == 2
    assert f"{spec}: a Ray Jobs spec needs an 'entrypoint'" in capsys.readouterr().err
