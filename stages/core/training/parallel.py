"""How training workers share the policy: one process, DDP or FSDP2, with optional LoRA adapters.

- `ddp`: every worker holds the whole policy; torch's DistributedDataParallel all-reduces
  gradients bucket by bucket while backward still runs.
- `fsdp`: FSDP2 (`fully_shard` per decoder layer, then the root): each worker holds 1/N of the
  parameters, gradients and AdamW state, and gathers one layer's parameters at a time.

Both average gradients over workers; the trainer scales each worker's loss by the world size, so
the step's gradient is the sum over the global batch, as one worker computes it. Every
collective must run the same number of times on every worker: `ghost` micro-batches (a forward
and backward of weight zero) fill in where a worker's slice of a batch is shorter.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Callable, Iterator

import torch


class PolicyCall(torch.nn.Module):
    """The module DDP and FSDP2 wrap. Its forward runs `fn(policy, *args)`, so our own scoring (the
    base model, then the LM head only at scored positions) goes through the wrapper's hooks: DDP's
    gradient-sync set-up and FSDP2's gather of the root's own parameters (embeddings, final norm,
    LM head), which a direct call of `policy.model` would bypass."""

    def __init__(self, policy: torch.nn.Module):
        super().__init__()
        self.policy = policy

    def forward(self, fn: Callable, *args: Any) -> Any:
        return fn(self.policy, *args)


def add_lora(model, r: int, alpha: float, dropout: float, target_modules: str):
    """Inject LoRA adapters into `model` in place (peft); freezes everything else. Returns
    (the same transformers model, now with adapters, and the LoraConfig)."""
    from peft import LoraConfig, get_peft_model

    targets = "all-linear" if target_modules == "all-linear" else [m.strip() for m in target_modules.split(",")]
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type="CAUSAL_LM")
    with warnings.catch_warnings():  # peft 0.21 asks transformers 5 by the old name: not the user's concern
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        peft_model = get_peft_model(model, config)
    # Score and save the transformers model itself: the adapters sit inside its linear layers.
    return peft_model.get_base_model(), peft_model.peft_config["default"]


def decoder_layers(model) -> list[torch.nn.Module]:
    """The repeated blocks FSDP2 shards one by one (transformers names their classes in
    `_no_split_modules`)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"{type(model).__name__}: no decoder layers found to shard (_no_split_modules {names})")
    return layers


def wrap(model, strategy: str, world: int, dtype: str) -> torch.nn.Module:
    """The module the loop calls: `PolicyCall(model)`, under DDP or FSDP2 when there are workers."""
    call = PolicyCall(model)
    if world == 1:
        return call
    if strategy == "ddp":
        # No buffer broadcast: the policy's buffers (rotary frequencies) are the same on every worker.
        # (Newer torch renames the flag; the old name still means "no sync at all".)
        import warnings

        from torch.nn.parallel import DistributedDataParallel

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*broadcast_buffers.*")
            return DistributedDataParallel(call, broadcast_buffers=False)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if dtype == "bfloat16" \
        else MixedPrecisionPolicy()
    for layer in decoder_layers(model):
        fully_shard(layer, mp_policy=mp)
    fully_shard(call, mp_policy=mp)
    return call


def meta_model(path: str):
    """The model of `path`'s config on the meta device: shapes only, no memory."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def fill_from_rank0(model, full, device: str) -> None:
    """Give a sharded meta `model` its values: rank 0 holds `full` (the whole model, on CPU; None
    elsewhere) and sends each tensor once, every worker keeping only its shard."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    model.to_empty(device=device)
    state = full.state_dict() if full is not None else {}
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    # Non-persistent buffers (rotary frequencies) are in no state dict: rank 0 sends its own.
    for name, buffer in model.named_buffers():
        if full is not None:
            buffer.copy_(full.get_buffer(name))
        dist.broadcast(buffer, src=0)


@contextlib.contextmanager
def grad_sync(wrapped: torch.nn.Module, on: bool) -> Iterator[None]:
    """Backward inside this context syncs gradients only when `on` (the last micro-batch of a step):
    the others accumulate locally."""
    if on:
        yield
    elif hasattr(wrapped, "no_sync"):  # DDP
        with wrapped.no_sync():
            yield
    elif hasattr(wrapped, "set_requires_gradient_sync"):  # FSDP2
        wrapped.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            wrapped.set_requires_gradient_sync(True)
    else:
        yield


def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float) -> float:
    """Clip to `max_norm` (0: off) and return the global norm before clipping (sharded grads too)."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor over the shards
        norm = norm.full_tensor()
    return float(norm)


def full_state_dict(model, frozen: bool = True) -> dict:
    """The model's full state dict on rank 0, on CPU (other ranks get {}); a collective under FSDP2,
    which gathers one tensor at a time to rank 0's CPU: never more than one full copy anywhere."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                 ignore_frozen_params=not frozen))
    # The gather copies every key on its own, so a tied LM head arrives as a second tensor equal to the
    # embeddings. transformers' save_pretrained drops a tied key only when it shares storage with its
    # source: alias it back, and `final/` holds the matrix once, as one worker's does.
    for name, source in tied_names(model).items():
        if name in state and source in state:
            state[name] = state[source]
    return state


def tied_names(model) -> dict[str, str]:
    """{name: the first name of the same parameter} for parameters the model shares under several
    names (an LM head tied to the embeddings), read from the module itself rather than its config."""
    first: dict[int, str] = {}
    tied = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        tied[name] = first.setdefault(id(param), name)
    return {name: source for name, source in tied.items() if name != source}


def merge_lora(state: dict, lora) -> dict:
    """A plain transformers state dict from one with LoRA layers: W + alpha / r * B @ A, adapter
    keys dropped, `base_layer` names restored."""
    scale = lora.lora_alpha / lora.r
    merged = {}
    for key, value in state.items():
        if ".lora_" in key:
            continue
        if ".base_layer." in key:
            prefix, _, leaf = key.partition(".base_layer.")
            if leaf == "weight" and f"{prefix}.lora_A.default.weight" in state:
                a, b = state[f"{prefix}.lora_A.default.weight"], state[f"{prefix}.lora_B.default.weight"]
                value = (value.float() + scale * (b.float() @ a.float())).to(value.dtype)
            key = f"{prefix}.{leaf}"
        merged[key] = value
    return merged


def adapter_state(state: dict) -> dict:
    """The adapter weights under the names peft saves and loads (`PeftModel.from_pretrained`)."""
    return {"base_model.model." + k.replace(".default.", "."): v for k, v in state.items() if ".lora_" in k}
