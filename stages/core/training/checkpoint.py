"""Checkpoints that resume exactly: weights, optimizer, scheduler, RNG states and the data cursor.

OUTPUT/checkpoints/step-N/ holds
- `state/`: the trained weights and their AdamW state as a `torch.distributed.checkpoint`. Each
  worker writes its own part (its shard under FSDP2); any number of workers loads it back
  (2 -> 1, 1 -> 2, ddp <-> fsdp), since the files record each tensor's global shape. With LoRA
  only the adapters are in it: the frozen base is `policy.json`'s model, loaded at start.
- `trainer_state.pt` (scheduler, Python RNG), `rng-R.pt` (worker R's torch RNG), `policy.json`
  (base model, LoRA settings), the model config and tokenizer, and `state.json` (step, epoch,
  cursor). `eval --model checkpoints/step-N` loads the policy from these.

`state.json` is written last (renamed into place locally, uploaded last to an object store), and
only folders that have it count, so a crash never leaves a half checkpoint that `--resume`
would pick. OUTPUT may be a local folder or an fsspec URL: the files are written in a local
staging folder first, then each worker uploads the files it wrote.

A checkpoint that fails while it is written (a full disk, above all) is deleted at once, and what a
killed writer left is deleted at the next start (`remove_partials`): a half checkpoint would only
take the space the next one needs. The error names the checkpoint and says the disk is full.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import shutil
import warnings
from typing import Any, Iterator, NamedTuple

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


def remove_partials(staging: str) -> None:
    """Delete the half-written checkpoints a killed run left in its staging folder."""
    root = os.path.join(staging, CHECKPOINTS)
    if os.path.isdir(root):
        for name in os.listdir(root):
            if name.startswith(".step-") and name.endswith(".partial"):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)


class Parts(NamedTuple):
    """What a checkpoint saves and restores."""

    model: Any        # the transformers model (its parameters may be FSDP2 shards)
    tokenizer: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    policy: dict      # {"model": base model path, "lora": LoRA settings or None}


@contextlib.contextmanager
def _quiet_single_process() -> Iterator[None]:
    """torch.distributed.checkpoint warns on every single-process save and load that it assumes one
    process: that is what we asked for."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _state_dicts(parts: Parts) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    # Frozen weights (a LoRA base) are not saved: they are the base model's, loaded at start.
    options = StateDictOptions(ignore_frozen_params=True)
    return {"model": get_model_state_dict(parts.model, options=options),
            "optim": get_optimizer_state_dict(parts.model, parts.optimizer, options=options)}


def _write_shards(folder: str, parts: Parts, group) -> None:
    """This worker's part: its slice of the weights and optimizer state, and its torch RNG."""
    import torch.distributed.checkpoint as dcp

    with _quiet_single_process():
        dcp.save(_state_dicts(parts), storage_writer=dcp.FileSystemWriter(os.path.join(folder, "state")),
                 no_dist=not group.on)
    _torch_save(torch.get_rng_state(), os.path.join(folder, f"rng-{group.rank}.pt"))


def _write_rest(folder: str, step: int, parts: Parts, state: dict) -> None:
    """Rank 0's files: scheduler and Python RNG, what the policy is, config, tokenizer, state.json last."""
    _torch_save({"scheduler": parts.scheduler.state_dict(), "python_rng": random.getstate()},
                os.path.join(folder, "trainer_state.pt"))
    parts.model.config.save_pretrained(folder)
    parts.tokenizer.save_pretrained(folder)
    with open(os.path.join(folder, "policy.json"), "w") as fh:
        json.dump(parts.policy, fh, indent=1)
    with open(os.path.join(folder, MARKER), "w") as fh:
        json.dump({"step": step, **state}, fh, indent=1)


def _writer(rel: str) -> int:
    """Which worker wrote a checkpoint file: `state/__R_N.distcp` and `rng-R.pt` are worker R's,
    everything else rank 0's."""
    name = os.path.basename(rel)
    if name.startswith("__") and name[2:].split("_")[0].isdigit():
        return int(name[2:].split("_")[0])
    if name.startswith("rng-") and name[4:-3].isdigit():
        return int(name[4:-3])
    return 0


def _own_files(folder: str, rank: int) -> list[str]:
    """The files worker `rank` wrote, relative to `folder` (rank 0's with state.json last)."""
    files = [os.path.relpath(os.path.join(d, f), folder) for d, _, names in os.walk(folder) for f in names]
    return sorted((f for f in files if _writer(f) == rank), key=lambda f: (f == MARKER, f))


def save(output: str, staging: str, step: int, parts: Parts, state: dict, keep: int, group) -> str:
    """Every worker calls this (`group`: the workers, a `distributed.Dist`): write step-N in the
    staging folder (each worker its part), publish it to OUTPUT (each worker uploads its own files,
    rank 0 the rest, state.json last), drop all but the last `keep`. Returns the checkpoint's URL."""
    local_root = os.path.join(staging, CHECKPOINTS)
    final = os.path.join(local_root, f"step-{step}")
    tmp = os.path.join(local_root, f".step-{step}.partial")
    url = storage.join(output, CHECKPOINTS, f"step-{step}")
    main = group.rank == 0
    if main:
        with storage.local_write(final):  # the first write into the output: on a read-only disk, one line
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
    group.barrier()
    try:
        with storage.local_write(final):
            os.makedirs(tmp, exist_ok=True)  # another node's staging folder
            _write_shards(tmp, parts, group)
            group.barrier()
            if main:
                _write_rest(tmp, step, parts, state)
    except BaseException:  # also Ctrl-C: nothing half-written stays behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not storage.is_local(output) and not main:
        for rel in _own_files(tmp, group.rank):
            storage.upload(os.path.join(tmp, rel), storage.join(url, rel))
    group.barrier()  # every worker's part is in place before rank 0 completes the checkpoint
    if main:
        with storage.local_write(final):
            _publish(output, local_root, tmp, final, url, keep)
    group.barrier()
    return url


def _publish(output: str, local_root: str, tmp: str, final: str, url: str, keep: int) -> None:
    """Rank 0: rename the written checkpoint into place, upload rank 0's files (state.json last: the
    checkpoint counts from then on), drop all but the last `keep`."""
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for rel in _own_files(final, 0):
        storage.upload(os.path.join(final, rel), storage.join(url, rel))
    old = _steps(output)[:-keep] if keep > 0 else []
    for s in old:
        storage.remove_tree(storage.join(output, CHECKPOINTS, f"step-{s}"))
        shutil.rmtree(os.path.join(local_root, f"step-{s}"), ignore_errors=True)


def _reader(url: str):
    import torch.distributed.checkpoint as dcp

    if storage.is_local(url):
        return dcp.FileSystemReader(url)
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

    return FsspecReader(url, **storage._options(None))


def _load_bytes(url: str):
    return torch.load(io.BytesIO(storage.read_bytes(url)), weights_only=False)


def load(url: str, parts: Parts, group) -> dict:
    """Restore a checkpoint into live objects (whatever the number of workers that wrote it);
    returns state.json. Every worker calls this and reads only what it needs."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    if not storage.exists(storage.join(url, "policy.json")):
        raise CheckpointError(f"checkpoint {url} was written by an earlier version of this trainer (no policy.json, "
                              "no sharded state/): start over with --overwrite")
    policy = json.loads(storage.read_bytes(storage.join(url, "policy.json")))
    if bool(policy.get("lora")) != bool(parts.policy.get("lora")):
        raise CheckpointError(f"checkpoint {url} was written {'with' if policy.get('lora') else 'without'} LoRA; "
                              f"this run is {'with' if parts.policy.get('lora') else 'without'} it")
    wanted = _state_dicts(parts)
    try:
        with _quiet_single_process():
            dcp.load(wanted, storage_reader=_reader(storage.join(url, "state")), no_dist=not group.on)
    except (CheckpointException, RuntimeError, KeyError, ValueError) as e:  # a missing key, a shape that does not fit
        failures = getattr(e, "failures", None)
        cause = next(iter(failures.values()))[0] if failures else e
        raise CheckpointError(f"checkpoint {url} does not fit the model: {str(cause).splitlines()[0][:300]}") from None
    set_model_state_dict(parts.model, wanted["model"])
    set_optimizer_state_dict(parts.model, parts.optimizer, wanted["optim"])
    trainer_state = _load_bytes(storage.join(url, "trainer_state.pt"))
    parts.scheduler.load_state_dict(trainer_state["scheduler"])
    random.setstate(trainer_state["python_rng"])
    rng = storage.join(url, f"rng-{group.rank}.pt")
    torch.set_rng_state(_load_bytes(rng if storage.exists(rng) else storage.join(url, "rng-0.pt")))
    return json.loads(storage.read_bytes(storage.join(url, MARKER)))


def load_policy_model(path: str, device: str = "cpu"):
    """A policy to score from any folder a run writes: final/ or best/ (plain transformers), an
    adapter folder (final/adapter: its base plus the adapter, merged), or checkpoints/step-N."""
    from stages.core.runtime.models import load_model

    if os.path.exists(os.path.join(path, "adapter_config.json")):
        from peft import PeftModel

        with open(os.path.join(path, "adapter_config.json")) as fh:
            base = json.load(fh)["base_model_name_or_path"]
        return PeftModel.from_pretrained(load_model(base, "float32", device), path).merge_and_unload()
    if not (os.path.exists(os.path.join(path, MARKER)) and os.path.isdir(os.path.join(path, "state"))):
        return load_model(path, "float32", device)
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from stages.core.training.parallel import add_lora

    with open(os.path.join(path, "policy.json")) as fh:
        policy = json.load(fh)
    model = load_model(policy["model"], "float32", device)
    if policy.get("lora"):
        model, _ = add_lora(model, **policy["lora"])
    wanted = {"model": get_model_state_dict(model, options=StateDictOptions(ignore_frozen_params=True))}
    with _quiet_single_process():
        dcp.load(wanted, storage_reader=dcp.FileSystemReader(os.path.join(path, "state")), no_dist=True)
    model.load_state_dict(wanted["model"], strict=False)
    return model
