"""Checkpoints that resume exactly: weights, optimizer, scheduler, RNG states and the data cursor.

OUTPUT/checkpoints/step-N/ holds the policy as safetensors (`save_pretrained`, loadable by
AutoModelForCausalLM), `trainer_state.pt` (optimizer, scheduler, RNG) and `state.json` (step,
epoch, cursor). `state.json` is written last (renamed into place locally, uploaded last to an
object store), and only folders that have it count, so a crash never leaves a half checkpoint
that `--resume` would pick. OUTPUT may be a local folder or an fsspec URL; the files are written
in a local staging folder first.

A checkpoint that fails while it is written (a full disk, above all) is deleted at once, and what a
killed writer left is deleted at the next start (`remove_partials`): a half checkpoint would only
take the space the next one needs. The error names the checkpoint and says the disk is full.
"""

from __future__ import annotations

import json
import os
import random
import shutil

import torch

from stages.core import storage
from stages.core.errors import PipelineError

CHECKPOINTS = "checkpoints"
MARKER = "state.json"


class CheckpointError(PipelineError):
    """A checkpoint that does not fit the model being trained."""


def step_of(name: str) -> int | None:
    """'step-12' -> 12; None for any other name."""
    prefix, _, number = name.partition("-")
    return int(number) if prefix == "step" and number.isdigit() else None


def _steps(output: str) -> list[int]:
    root = storage.join(output, CHECKPOINTS)
    steps = [s for s in map(step_of, storage.list_names(root)) if s is not None]
    return sorted(s for s in steps if storage.exists(storage.join(root, f"step-{s}", MARKER)))


def latest(output: str) -> str | None:
    steps = _steps(output)
    return storage.join(output, CHECKPOINTS, f"step-{steps[-1]}") if steps else None


class _KeepsWriteError:
    """The file torch.save writes through: torch reports a failed write only as "unexpected pos N
    vs M", so the OSError behind it (a full disk) is kept here to be raised instead."""

    def __init__(self, fh):
        self.fh, self.error = fh, None

    def write(self, data) -> int:
        try:
            return self.fh.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.fh.flush()


def _torch_save(obj, path: str) -> None:
    with open(path, "wb") as fh:
        out = _KeepsWriteError(fh)
        try:
            torch.save(obj, out)
        except RuntimeError:
            if out.error is None:
                raise
            raise out.error from None


def _write(folder: str, step: int, model, tokenizer, optimizer, scheduler, state: dict) -> None:
    os.makedirs(folder)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    _torch_save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "rng": {"torch": torch.get_rng_state(), "python": random.getstate()}},
                os.path.join(folder, "trainer_state.pt"))
    with open(os.path.join(folder, MARKER), "w") as fh:
        json.dump({"step": step, **state}, fh, indent=1)


def remove_partials(staging: str) -> None:
    """Delete the half-written checkpoints a killed run left in its staging folder."""
    root = os.path.join(staging, CHECKPOINTS)
    if os.path.isdir(root):
        for name in os.listdir(root):
            if name.startswith(".step-") and name.endswith(".partial"):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def save(output: str, staging: str, step: int, model, tokenizer, optimizer, scheduler, state: dict, keep: int) -> str:
    """Write step-N in the staging folder, publish it to OUTPUT, drop all but the last `keep`."""
    local_root = os.path.join(staging, CHECKPOINTS)
    final = os.path.join(local_root, f"step-{step}")
    tmp = os.path.join(local_root, f".step-{step}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with storage.local_write(final):
            _write(tmp, step, model, tokenizer, optimizer, scheduler, state)
    except BaseException:  # also Ctrl-C: nothing half-written stays behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    url = storage.join(output, CHECKPOINTS, f"step-{step}")
    storage.upload(final, url, last=(MARKER,))
    old = _steps(output)[:-keep] if keep > 0 else []
    for s in old:
        storage.remove_tree(storage.join(output, CHECKPOINTS, f"step-{s}"))
        shutil.rmtree(os.path.join(local_root, f"step-{s}"), ignore_errors=True)
    return url


def load(url: str, staging: str, model, optimizer, scheduler) -> dict:
    """Restore everything saved by `save` into live objects; returns state.json."""
    from safetensors.torch import load_file

    path = os.path.join(staging, CHECKPOINTS, url.rstrip("/").rsplit("/", 1)[-1])
    storage.download(url, path)
    weights = {}
    for name in os.listdir(path):
        if name.endswith(".safetensors"):
            weights.update(load_file(os.path.join(path, name)))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    # Tied embeddings are saved once; anything else missing is a broken checkpoint.
    missing = [k for k in missing if not k.endswith("lm_head.weight")]
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {url} does not fit the model: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    trainer_state = torch.load(os.path.join(path, "trainer_state.pt"), weights_only=False)
    optimizer.load_state_dict(trainer_state["optimizer"])
    scheduler.load_state_dict(trainer_state["scheduler"])
    torch.set_rng_state(trainer_state["rng"]["torch"])
    random.setstate(trainer_state["rng"]["python"])
    with open(os.path.join(path, MARKER)) as fh:
        return json.load(fh)
