"""A training run's output folder, settled before any worker starts: where it is, what a run writes
there, and whether the run resumes from its latest checkpoint or starts over (the old run's files
removed, and refused where they hold something to lose).
"""

from __future__ import annotations

import os

from stages.core import console, storage
from stages.core.config.options import TrainConfig
from stages.core.errors import PipelineError
from stages.core.training import checkpoint

# What a run writes in OUTPUT; `--overwrite` removes exactly these before starting over.
RUN_FILES = ("checkpoints", "metrics.jsonl", "tensorboard", "final", "best", "curves.png", "train_config.yaml",
             "summary.json")


class TrainingError(PipelineError):
    """A run that cannot go on: non-finite loss, nothing to resume, a mismatched output."""


def output_dir(cfg: TrainConfig) -> str:
    return cfg.output or storage.join(cfg.refs, "policy")


def prepare_output(cfg: TrainConfig) -> str | None:
    """Decide, before any worker starts, whether the run resumes or starts over; returns the
    checkpoint to resume from. Starting over removes the old run's files, so no stale checkpoint
    can outrank the new run's or be picked up by a later --resume."""
    out = output_dir(cfg)
    last = checkpoint.latest(out)
    if cfg.resume == "true" and last is None:
        raise TrainingError(f"--resume: no checkpoint under {out}/checkpoints (run with --save-every N first; "
                            "without --resume a run that left none starts over)")
    if last is not None and cfg.resume != "false":
        return last
    if not cfg.overwrite:
        _check_nothing_to_lose(out, last, cfg.resume)
    staging = storage.staging_dir(out)
    for name in RUN_FILES:
        storage.remove_tree(storage.join(out, name))
        if staging != out:
            storage.remove_tree(os.path.join(staging, name))
    return None


def _check_nothing_to_lose(out: str, last: str | None, resume: str) -> None:
    """Refuse to start over where the old run left something to keep: a checkpoint (without --resume)
    or weights (final/, best/; --resume auto replaces them). A run that stopped before its first
    checkpoint left only its logs: it starts over, and says so."""
    if last is not None:
        raise TrainingError(f"{out} already holds a run with checkpoints: pass --resume to continue it or "
                            "--overwrite to start over")
    weights = [name + "/" for name in ("final", "best") if storage.exists(storage.join(out, name))]
    if weights and resume != "auto":
        raise TrainingError(f"{out} already holds a run's weights ({', '.join(weights)}) and no checkpoint: "
                            "pass --overwrite to start over, or choose another --output")
    if weights:
        console.say("train", f"{out} holds a run's weights ({', '.join(weights)}) and no checkpoint: "
                    "--resume auto starts over")
    elif any(storage.exists(storage.join(out, name)) for name in ("metrics.jsonl", "checkpoints")):
        console.say("train", f"{out} holds a run that stopped before its first checkpoint: nothing to resume, "
                    "starting over")
