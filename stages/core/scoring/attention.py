"""The `attention` setting: how packed rows attend, one name for precompute, train and eval.

- dense: a row per pair, right-padded, a (T, T) additive mask each (`packing.pack_rows`): the CPU path;
- flex: pairs end to end under a FlexAttention BlockMask (`flex`), compiled on CUDA;
- varlen: pairs end to end as variable-length documents (`varlen`), flash attention's varlen kernels
  on CUDA, no mask at all;
- auto: flex on CUDA where torch has it and the model's attention is dispatched by name, else varlen
  on CUDA where a flash varlen kernel is there, else dense.

The three give the same values to float precision; tests hold them together.
"""

from __future__ import annotations

import contextlib

import torch

from stages.core.config.engine import ConfigError
from stages.core.scoring import flex, varlen
from stages.core.scoring.packing import supports_4d_mask

CHOICES = ("auto", "dense", "flex", "varlen")
FLAT = ("flex", "varlen")  # the paths that lay pairs end to end in one sequence


def _dispatched(model) -> bool:
    """Whether transformers dispatches the model's own attention by name to sdpa/eager/flex (not flash kernels)."""
    return own_implementation(model) in ("sdpa", "eager", "flex_attention")


def _head_dim(model) -> int | None:
    cfg = getattr(model, "config", None)
    heads = getattr(cfg, "num_attention_heads", None)
    return getattr(cfg, "head_dim", None) or (cfg.hidden_size // heads if heads else None)


def _no_flat_reason(model) -> str | None:
    """Why the flat paths cannot compute what the model's own attention does, or None. Their kernels take a
    plain causal softmax: no logit soft-capping (Gemma 2), no attention sinks (gpt-oss); and they lay rows
    end to end, which a model spread over GPUs cannot take (its layers' inputs move between devices, the
    BlockMask's and the documents' index tensors do not)."""
    cfg = getattr(model, "config", None)
    if getattr(cfg, "attn_logit_softcapping", None):
        return "its attention soft-caps logits (attn_logit_softcapping)"
    if model is not None and hasattr(model, "modules") and any(
            isinstance(getattr(m, "sinks", None), torch.Tensor) for m in model.modules()):
        return "its attention has sinks"
    devices = set((getattr(model, "hf_device_map", None) or {}).values())
    if len(devices) > 1:
        return f"it is spread over {len(devices)} devices"
    return None


def resolve(choice: str, device: str, model=None, backward: bool = False) -> str:
    """`attention` -> the path used: "dense", "flex" or "varlen" (see the module's docstring). A path asked
    for where it cannot run is an error, not a silent fallback: flex without FlexAttention, with a
    flash-attention model, with gradients off CUDA (FlexAttention has no backward there) or with heads of
    fewer than 16 dimensions on CUDA (its compiled kernel's minimum); a flat path for a model it cannot
    compute (`_no_flat_reason`)."""
    if choice not in CHOICES:
        raise ConfigError(f"config key 'attention': one of {', '.join(CHOICES)}, not {choice!r}")
    if choice == "dense":
        return choice
    reason = _no_flat_reason(model) if model is not None else None
    if reason and choice != "auto":
        raise ConfigError(f"config key 'attention': {choice} cannot score this model: {reason}; use dense")
    if choice == "varlen":
        return choice
    small_heads = device == "cuda" and (_head_dim(model) or 64) < 16
    if choice == "flex":
        if not flex.available():
            raise ConfigError("config key 'attention': flex needs torch >= 2.5 (torch.nn.attention.flex_attention)")
        if model is not None and not _dispatched(model):
            raise ConfigError(f"config key 'attention': flex needs a model whose attention transformers dispatches by "
                              f"name; this one uses {own_implementation(model)!r} (try varlen)")
        if backward and device != "cuda":
            raise ConfigError("config key 'attention': flex trains only on CUDA (FlexAttention has no backward on "
                              f"{device}); use auto, dense or varlen there")
        if small_heads:
            raise ConfigError(f"config key 'attention': flex on CUDA needs heads of 16 dimensions or more (this "
                              f"model's have {_head_dim(model)}); use auto, dense or varlen")
        return "flex"
    if device != "cuda" or reason:
        return "dense"
    if flex.available() and _dispatched(model) and not small_heads:
        return "flex"
    return "varlen" if varlen.fast_kernel_available() else "dense"


def packs(path: str, model, pack_prompts: bool) -> bool:
    """Whether pairs run as packed rows (prompt once): on the flat paths always; dense needs a model that
    takes a 4D mask (flash-attention models then score chosen and rejected as separate sequences)."""
    return pack_prompts and (path in FLAT or supports_4d_mask(model))


def pack(path: str, rows: list[tuple], pad_id: int, device=None):
    """The flat paths' layout of rows for `scored_logps`: (inputs, rows, cols, labels, seq_ids)."""
    return flex.pack_flat(rows, pad_id, device) if path == "flex" else varlen.pack_varlen(rows, pad_id, device)


# id(config) -> the model's own attention while one of ours is swapped in (nested blocks keep the first)
_own: dict[int, str] = {}


def own_implementation(model) -> str:
    """The attention the model was loaded with, also inside `attention_in`."""
    config = getattr(model, "config", None)
    return _own.get(id(config), getattr(config, "_attn_implementation", "sdpa"))


@contextlib.contextmanager
def attention_in(model, path: str):
    """The model's attention on `path` inside the block: its config names the function transformers
    dispatches to, set back afterwards (generate and the dense path are untouched). Training holds it over
    forward AND backward: activation checkpointing runs each layer's forward again inside backward, and
    transformers looks the function up by that name at every call, the recompute's included."""
    if path not in FLAT:
        yield
        return
    module = flex if path == "flex" else varlen
    module.register()
    config = model.config
    before = config._attn_implementation
    outer = id(config) not in _own
    if outer:
        _own[id(config)] = before
    config._attn_implementation = module.NAME
    try:
        yield
    finally:
        config._attn_implementation = before
        if outer:
            del _own[id(config)]
