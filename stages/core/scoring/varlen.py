"""Packed rows as variable-length documents: padding-free attention without a mask of any kind.

The rows lie end to end as on the flex path (`flat.lay_flat`, no padding at all), and attention is
told where each document starts (cumulative lengths, as flash-attention's varlen kernels take them):

- document A of a row: the prefix and `first`, causal;
- document B: `second`'s queries over keys gathered from the prefix and `second` itself, causal with
  the diagonal at the bottom right (query k of `second` sees the whole prefix and `second` up to k).

So the prompt's queries run once and `second` never sees `first`, as on the dense and flex paths;
the only copy is of the prefix's keys and values (T x heads x dim, no (T, T) anything).

Kernels, by what the device and torch offer (`kernel`):
- "torch": `torch.nn.attention.varlen.varlen_attn` (flash attention inside torch; CUDA, fp16/bf16),
  with one split per sequence where this torch can say so, so a sequence's values do not depend on
  its neighbours;
- "flash_attn": the flash-attn package's `flash_attn_varlen_func`, where it is installed;
- "reference": each document through `scaled_dot_product_attention` on its own with an explicit
  (q, k) causal mask: any device and dtype, with gradients; what CPU tests and float32 use.
Both flash kernels align a causal mask of fewer queries than keys at the bottom right, which is what
document B needs.
"""

from __future__ import annotations

import functools
import inspect
import itertools
from dataclasses import dataclass

import torch

from stages.core.scoring.flat import lay_flat, unsupported

NAME = "dpo_varlen"  # the attention function registered with transformers for the model's forward
KWARG = "dpo_varlen"  # the model-forward keyword that carries the documents down to each attention call


@dataclass(frozen=True)
class Docs:
    """The documents of one flat sequence: queries [cu_q[i], cu_q[i+1]) attend to keys
    key_index[cu_k[i]:cu_k[i+1]] (key_index None: keys are the queries' own positions). `bounds_q` and
    `bounds_k` hold the same boundaries as Python ints (the reference kernel slices by them without a
    device sync)."""
    cu_q: torch.Tensor
    cu_k: torch.Tensor
    key_index: torch.Tensor | None
    max_q: int
    max_k: int
    bounds_q: tuple[int, ...]
    bounds_k: tuple[int, ...]


def docs_of(spans: list[tuple[int, int, int, int]], device=None) -> Docs:
    """Per row (at, prefix, first, second) -> its documents (see the module's docstring)."""
    lens_q: list[int] = []
    lens_k: list[int] = []
    keys: list[int] = []
    for at, lp, lc, lr in spans:
        lens_q.append(lp + lc)
        lens_k.append(lp + lc)
        keys += range(at, at + lp + lc)
        if lr:
            lens_q.append(lr)
            lens_k.append(lp + lr)
            keys += [*range(at, at + lp), *range(at + lp + lc, at + lp + lc + lr)]
    bounds_q, bounds_k = (tuple(itertools.accumulate(lens, initial=0)) for lens in (lens_q, lens_k))
    shared = any(lr for *_, lr in spans)  # some second sees a prefix it is not next to: gather the keys
    return Docs(torch.tensor(bounds_q, dtype=torch.int32, device=device),
                torch.tensor(bounds_k, dtype=torch.int32, device=device),
                torch.tensor(keys, dtype=torch.long, device=device) if shared else None,
                max(lens_q, default=0), max(lens_k, default=0), bounds_q, bounds_k)


def pack_varlen(rows: list[tuple], pad_id: int, device=None):
    """Rows (prefix, first, second, seq_first, seq_second) -> one unpadded sequence for `scored_logps`:
    (inputs, rows, cols, labels, seq_ids) like `packing.pack_rows`. inputs carries no attention mask;
    inputs[KWARG] is its `Docs`, which the model passes down to `attention_forward`."""
    flat = lay_flat(rows, pad_id)
    ids, pos, r, cols, labels, seq_ids = flat.tensors(device)
    return {"input_ids": ids, "position_ids": pos, KWARG: docs_of(flat.spans, device)}, r, cols, labels, seq_ids


# --- kernels ---------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _torch_varlen():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


@functools.lru_cache(maxsize=None)
def _flash_attn():
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


def kernel(device_type: str, dtype: torch.dtype) -> str:
    """The kernel a forward on `device_type` with `dtype` queries uses: "torch", "flash_attn" or "reference"."""
    if device_type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        if _torch_varlen() is not None:
            return "torch"
        if _flash_attn() is not None:
            return "flash_attn"
    return "reference"


def fast_kernel_available() -> bool:
    """Whether a CUDA forward in bf16 would get a flash kernel (what `attention=auto` asks of varlen)."""
    return _torch_varlen() is not None or _flash_attn() is not None


@torch.compiler.disable  # a compiled layer calls it as is: traced, its loop would unroll per document count
def _reference(q, k, v, docs: Docs, scale) -> torch.Tensor:
    """(T, H, D) queries, (Tk, Hkv, D) keys and values -> (T, H, D): each document on its own."""
    out = []
    groups = q.shape[1] // k.shape[1]
    for i in range(len(docs.bounds_q) - 1):
        q0, q1, k0, k1 = docs.bounds_q[i], docs.bounds_q[i + 1], docs.bounds_k[i], docs.bounds_k[i + 1]
        if q1 == q0:
            continue
        lq, lk = q1 - q0, k1 - k0
        # bottom-right causal: query j sees keys 0 .. j + (lk - lq)
        allow = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(lk - lq)
        kk, vv = (x[k0:k1].transpose(0, 1).repeat_interleave(groups, dim=0) for x in (k, v))
        out.append(torch.nn.functional.scaled_dot_product_attention(q[q0:q1].transpose(0, 1), kk, vv,
                                                                   attn_mask=allow, scale=scale).transpose(0, 1))
    return torch.cat(out) if out else q.new_zeros(q.shape)


def _flash(q, k, v, docs: Docs, scale, which: str) -> torch.Tensor:
    if which == "flash_attn":
        return _flash_attn()(q, k, v, docs.cu_q, docs.cu_k, docs.max_q, docs.max_k, softmax_scale=scale, causal=True)
    fn, params = _torch_varlen()
    kw = {"scale": scale}
    if "window_size" in params:  # torch >= 2.12 says causal as a window; earlier ones had is_causal
        kw["window_size"] = (-1, 0)
    else:
        kw["is_causal"] = True
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in params:
            kw["enable_gqa"] = True
        else:
            k, v = (x.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for x in (k, v))
    if "num_splits" in params:  # one split: a sequence's values do not depend on the longest in the batch
        kw["num_splits"] = 1
    return fn(q, k, v, docs.cu_q, docs.cu_k, docs.max_q, docs.max_k, **kw)


def attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention signature: (1, H, T, D) query/key/value and the `Docs` as kwargs[KWARG]
    -> ((1, T, H, D) output, no weights)."""
    unsupported(kwargs)
    docs: Docs | None = kwargs.get(KWARG)
    if docs is None:
        raise RuntimeError("the varlen attention ran without its documents (pack_varlen's inputs)")
    window = kwargs.get("sliding_window")
    if window is not None and docs.max_k > window:
        raise RuntimeError(f"a document of {docs.max_k} tokens is longer than the model's sliding window ({window}): "
                           "score it with attention dense")
    q = query[0].transpose(0, 1)  # (T, H, D)
    k, v = (x[0].transpose(0, 1) for x in (key, value))
    device = q.device.type
    if torch.is_autocast_enabled(device):
        # Autocast casts sdpa's and flex's inputs, not a custom kernel's: rotary embeddings in float32 leave q
        # and k in float32 beside a bf16 v. Cast all three, as autocast would, so the flash kernel runs.
        dtype = torch.get_autocast_dtype(device)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    if docs.key_index is not None:
        k, v = k[docs.key_index], v[docs.key_index]
    which = kernel(device, q.dtype)
    out = _reference(q, k, v, docs, scaling) if which == "reference" else _flash(q.contiguous(), k.contiguous(),
                                                                                  v.contiguous(), docs, scaling, which)
    return out.unsqueeze(0), None


@functools.lru_cache(maxsize=None)
def register() -> None:
    """`attention_forward` registered with transformers under NAME (once)."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, attention_forward)
