"""Every command's option class by its name, and docs/options.md made from them."""

from __future__ import annotations

from stages.core.config import engine
from stages.core.config.chain import IterateConfig, RunConfig
from stages.core.config.online import GenerateConfig, JudgeConfig
from stages.core.config.options import EvalConfig, PrecomputeConfig, SweepConfig, TrainConfig

STAGE_CONFIGS = {"precompute": PrecomputeConfig, "train": TrainConfig, "eval": EvalConfig, "sweep": SweepConfig,
                 "run": RunConfig, "generate": GenerateConfig, "judge": JudgeConfig, "iterate": IterateConfig}


def options_markdown() -> str:
    """docs/options.md: one table per command, made from the dataclasses' help (a test keeps it current)."""
    return engine.options_markdown(STAGE_CONFIGS, [
        "Every key can be set in a YAML file (`--config FILE.yaml`) and overridden by its flag;",
        "precedence is defaults < YAML < flags. Made by `python -m stages.core.config > docs/options.md`",
        "from the config classes in `stages/core/config/`; a test fails when this file and the code differ.\n"])
