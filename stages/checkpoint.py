"""Checkpoints that resume exactly: weights, optimizer, scheduler, RNG states and the data cursor.

checkpoints/step-N/ holds the policy as safetensors (`save_pretrained`, loadable by
AutoModelForCausalLM), `trainer_state.pt` (optimizer, scheduler, RNG) and `state.json` (step,
epoch, cursor). The folder is written under a temporary name and renamed, so a crash never
leaves a half checkpoint that `--resume` would pick.
"""

from __future__ import annotations

import json
import os
import random
import shutil

import torch

CHECKPOINTS = "checkpoints"


def _step_dirs(output: str) -> list[tuple[int, str]]:
    root = os.path.join(output, CHECKPOINTS)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        if name.startswith("step-") and name[5:].isdigit() and os.path.exists(os.path.join(root, name, "state.json")):
            found.append((int(name[5:]), os.path.join(root, name)))
    return sorted(found)


def latest(output: str) -> str | None:
    dirs = _step_dirs(output)
    return dirs[-1][1] if dirs else None


def save(output: str, step: int, model, tokenizer, optimizer, scheduler, state: dict, keep: int) -> str:
    root = os.path.join(output, CHECKPOINTS)
    final = os.path.join(root, f"step-{step}")
    tmp = os.path.join(root, f".step-{step}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": {"torch": torch.get_rng_state(), "python": random.getstate()}},
               os.path.join(tmp, "trainer_state.pt"))
    with open(os.path.join(tmp, "state.json"), "w") as fh:
        json.dump({"step": step, **state}, fh, indent=1)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for _, old in _step_dirs(output)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load(path: str, model, optimizer, scheduler) -> dict:
    """Restore everything saved by `save` into live objects; returns state.json."""
    from safetensors.torch import load_file

    weights = {}
    for name in os.listdir(path):
        if name.endswith(".safetensors"):
            weights.update(load_file(os.path.join(path, name)))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    # Tied embeddings are saved once; anything else missing is a broken checkpoint.
    missing = [k for k in missing if not k.endswith("lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint {path} does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    trainer_state = torch.load(os.path.join(path, "trainer_state.pt"), weights_only=False)
    optimizer.load_state_dict(trainer_state["optimizer"])
    scheduler.load_state_dict(trainer_state["scheduler"])
    torch.set_rng_state(trainer_state["rng"]["torch"])
    random.setstate(trainer_state["rng"]["python"])
    with open(os.path.join(path, "state.json")) as fh:
        return json.load(fh)
