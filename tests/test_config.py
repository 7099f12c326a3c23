"""Config precedence (defaults < YAML < flags) and errors that name the key."""

from __future__ import annotations

import dataclasses

import pytest

from stages.core.config.engine import ConfigError, parse_args
from stages.core.config.options import PrecomputeConfig


def parse(argv):
    return parse_args(PrecomputeConfig, argv, prog="test")


def test_defaults():
    cfg = parse([])
    assert cfg.max_length == 1024 and cfg.truncation_mode == "keep_start" and cfg.dtype == "float32"


def test_yaml_then_flags_win(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("max_length: 256\nbatch_size: 4\ndtype: bfloat16\nlimit: null\n")
    cfg = parse(["--config", str(f), "--batch-size", "9", "--overwrite"])
    assert (cfg.max_length, cfg.batch_size, cfg.dtype, cfg.overwrite) == (256, 9, "bfloat16", True)
    assert parse(["--config", str(f), "--max-length", "none"]).max_length is None


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        parse([]).batch_size = 3


@pytest.mark.parametrize("yaml_text,key", [
    ("max_lenght: 5\n", "max_lenght"),
    ("batch_size: many\n", "batch_size"),
    ("dtype: float16\n", "dtype"),
    ("overwrite: maybe\n", "overwrite"),
    ("batch_size: 0\n", "batch_size"),
    ("max_length: 100\nmax_prompt_length: 100\n", "max_prompt_length"),
    ("truncation_mode: middle\n", "truncation_mode"),
])
def test_bad_yaml_names_the_key(tmp_path, yaml_text, key):
    f = tmp_path / "c.yaml"
    f.write_text(yaml_text)
    with pytest.raises(ConfigError, match=key):
        parse(["--config", str(f)])


def test_bad_flag_names_the_key():
    with pytest.raises(ConfigError, match="max_length"):
        parse(["--max-length", "abc"])


def test_yaml_must_be_a_mapping(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        parse(["--config", str(f)])


def test_resume_flag_forms(tmp_path):
    from stages.core.config.options import TrainConfig

    parse_train = lambda argv: parse_args(TrainConfig, argv, prog="t")  # noqa: E731
    assert parse_train([]).resume == "false"
    assert parse_train(["--resume"]).resume == "true"
    assert parse_train(["--resume", "auto"]).resume == "auto"
    f = tmp_path / "t.yaml"
    f.write_text("resume: true\nloss_type: sigmoid,sft\nloss_weights: 1,0.5\n")
    assert parse_train(["--config", str(f)]).resume == "true"
    with pytest.raises(ConfigError, match="loss_type"):
        parse_train(["--loss-type", "dpo"])


def test_storage_options_are_validated_and_redacted():
    from stages.core.config.engine import to_yaml
    from stages.core.config.options import TrainConfig

    with pytest.raises(ConfigError, match="storage_options"):
        parse_args(TrainConfig, ["--storage-options", "{not json"], prog="t")
    cfg = parse_args(TrainConfig, ["--storage-options", '{"key": "AKIA1", "secret": "hush", "endpoint_url": "http://x"}'],
                     prog="t")
    text = to_yaml(cfg)
    assert "hush" not in text and "AKIA1" not in text and "http://x" in text


def test_every_stage_config_parses_its_defaults_and_flags():
    from stages.core.config.options import EvalConfig, SweepConfig, TrainConfig

    assert parse_args(EvalConfig, ["--samples", "2", "--beta", "0.2"], prog="t") == EvalConfig(samples=2, beta=0.2)
    assert parse_args(SweepConfig, ["--beta", "0.1,0.2"], prog="t").beta == [0.1, 0.2]
    assert parse_args(TrainConfig, ["--loss-type", "sigmoid,sft", "--loss-weights", "1,0.2"],
                      prog="t").loss_terms == [("sigmoid", 1.0), ("sft", 0.2)]
    for cls in (PrecomputeConfig, TrainConfig, EvalConfig, SweepConfig):
        assert parse_args(cls, [], prog="t") == cls()


def test_sweep_passes_every_training_key_to_each_run():
    from stages.core.config.options import SweepConfig, TrainConfig

    cfg = parse_args(SweepConfig, ["--beta", "0.1,0.5", "--label-smoothing", "0.2", "--warmup-ratio", "0.3",
                                   "--gradient-checkpointing", "false", "--output", "out"], prog="t")
    run = cfg.run_config(0.5)
    assert type(run) is TrainConfig and run.beta == 0.5 and run.output == "out/beta-0.5"
    assert (run.label_smoothing, run.warmup_ratio, run.gradient_checkpointing) == (0.2, 0.3, False)
    with pytest.raises(ConfigError, match="beta"):
        parse_args(SweepConfig, ["--beta", "0.1,x"], prog="t")


def test_each_class_checks_its_own_keys():
    from stages.core.config.options import EvalConfig, TrainConfig

    with pytest.raises(ConfigError, match="warmup_ratio"):
        TrainConfig(warmup_ratio=2.0)
    with pytest.raises(ConfigError, match="top_p"):
        EvalConfig(top_p=0.0)
    with pytest.raises(ConfigError, match="rows_per_shard"):
        PrecomputeConfig(rows_per_shard=0)
    with pytest.raises(ConfigError, match="limit"):
        PrecomputeConfig(limit=-1)


def test_every_field_of_every_command_has_a_help_group():
    """--help is grouped from the config classes: a new key without a group would fail here, not land
    in a flat list."""
    from stages.core.config.commands import STAGE_CONFIGS
    from stages.core.config.engine import field_group, help_groups, ordered_fields

    for cls in STAGE_CONFIGS.values():
        groups = {f.name: field_group(cls, f) for f in ordered_fields(cls)}
        assert set(groups.values()) <= set(help_groups(cls)) - {"other"}, [k for k, g in groups.items() if g == "other"]
        assert len(set(groups.values())) > 3, cls.__name__


def test_a_default_is_said_once_as_it_is_typed():
    from stages.core.config.engine import with_default

    assert with_default("weights (default: all 1)", None) == "weights (default: all 1)"
    assert with_default("show a progress bar", True) == "show a progress bar (default: true)"
    assert with_default("read only N rows", None) == "read only N rows (default: none)"
    assert with_default("dtype", "float32") == "dtype (default: float32)"


def test_flags_take_their_full_name_only(capsys):
    """No abbreviations: `--lr` would bind to --lr-scheduler; `--flag=value` still works."""
    from stages.core.config.options import TrainConfig

    cfg = parse_args(TrainConfig, ["--learning-rate=1e-5", "--pack-prompts=false"], prog="t")
    assert (cfg.learning_rate, cfg.pack_prompts) == (1e-5, False)
    with pytest.raises(SystemExit):
        parse_args(TrainConfig, ["--lr", "1e-5"], prog="pipeline.py train")
    assert capsys.readouterr().err.startswith("error: pipeline.py train: unrecognized arguments: --lr 1e-5")


def test_a_renamed_key_names_its_new_name(capsys):
    """judge's reward-model length was `max_length`, a key that means a Truncation everywhere else."""
    from stages.core.config.engine import from_mapping
    from stages.core.config.online import JudgeConfig

    assert parse_args(JudgeConfig, ["--reward-max-tokens", "64"], prog="j").reward_max_tokens == 64
    with pytest.raises(ConfigError, match="--judge-options: key 'max_length' is now 'reward_max_tokens'"):
        from_mapping(JudgeConfig, {"max_length": 64}, source="--judge-options")
    with pytest.raises(SystemExit):
        parse_args(JudgeConfig, ["--max-length", "64"], prog="pipeline.py judge")
    assert "(did you mean --reward-max-tokens?)" in capsys.readouterr().err
