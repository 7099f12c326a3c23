"""Packed rows without a dense (T, T) mask: FlexAttention over pairs laid end to end.

The dense path (`packing.pack_rows`) gives each pair a row of its own, right-padded, with a 4D additive
mask of width^2 entries per row: padding, and memory quadratic in the row's length. Here several rows
(`pair_rows`: prefix, first, second) lie end to end in ONE sequence, padded only at its end to a
multiple of BLOCK, and attention is told who sees whom by a FlexAttention `BlockMask`:

- a token sees earlier tokens of its own row only (a document mask), so rows never mix;
- `second` sees the prefix but not `first`, and its positions restart right after the prefix,
  so each row computes exactly what two separate sequences would (as on the dense path).

The BlockMask is built from per-token intervals (`block_lists`), never from a (T, T) tensor: what
it holds grows as T^2 / BLOCK^2 block indices, and the kernel visits only the blocks a row touches,
so a 16k-token row costs close to its FLOPs. On CUDA the kernel is `torch.compile`d (a fused kernel);
on CPU flex runs unfused (it materialises scores inside the call), which is right for tests, so
`attention="auto"` keeps the dense path there.
"""

from __future__ import annotations

import functools
import warnings

import torch

from stages.core.scoring.flat import lay_flat, unsupported

BLOCK = 128  # FlexAttention's block: the unit of the block lists, and what a sequence is padded to
NAME = "dpo_flex"  # the attention function registered with transformers for the model's forward


def available() -> bool:
    """Whether this torch has FlexAttention (torch >= 2.5)."""
    try:
        from torch.nn.attention.flex_attention import BlockMask, flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


# --- layout ----------------------------------------------------------------------------------------


def pack_flat(rows: list[tuple], pad_id: int, device=None, block: int = BLOCK):
    """Rows (prefix, first, second, seq_first, seq_second) -> one sequence for `scored_logps`, the rows end
    to end (`flat.lay_flat`), padded at the end to a multiple of `block`. Returns (inputs, rows, cols, labels,
    seq_ids) like `packing.pack_rows`; inputs["attention_mask"] is a BlockMask."""
    flat = lay_flat(rows, pad_id, block)
    starts: list[int] = []  # per token: where its row starts (the first key it may see)
    hide_lo: list[int] = []  # per token: keys in [hide_lo, hide_hi) are hidden from it (second's view of first)
    hide_hi: list[int] = []
    for at, lp, lc, lr in flat.spans:
        starts += [at] * (lp + lc + lr)
        hide_lo += [0] * (lp + lc) + [at + lp] * lr
        hide_hi += [0] * (lp + lc) + [at + lp + lc] * lr
    pad = len(flat.ids) - flat.used  # the tail: one row of its own, causal, so no query is without a key
    starts += [flat.used] * pad
    hide_lo += [0] * pad
    hide_hi += [0] * pad
    t = lambda v: torch.tensor(v, dtype=torch.long, device=device)  # noqa: E731
    ids, pos, r, cols, labels, seq_ids = flat.tensors(device)
    inputs = {"input_ids": ids, "position_ids": pos, "attention_mask": block_mask(t(starts), t(hide_lo), t(hide_hi),
                                                                                  block)}
    return inputs, r, cols, labels, seq_ids


def _overlap(lo: torch.Tensor, hi: torch.Tensor, block: int, n_blocks: int) -> torch.Tensor:
    """(Q,) intervals [lo, hi) -> (Q, n_blocks): how many of each key block's positions they cover."""
    first = torch.arange(n_blocks, device=lo.device) * block
    return (torch.minimum(hi.unsqueeze(1), first + block) - torch.maximum(lo.unsqueeze(1), first)).clamp_(min=0)


def block_lists(starts: torch.Tensor, hide_lo: torch.Tensor, hide_hi: torch.Tensor, block: int = BLOCK,
                chunk: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """Which key blocks each query block sees partly, and which wholly: (partial, full), two (nq, nk) bool
    tensors. Query q sees keys [starts[q], q] minus [hide_lo[q], hide_hi[q]) (a sub-interval of it), so
    the keys it sees in a block are one interval overlap minus another: no (T, T) tensor, only
    (chunk, T / block) at a time."""
    length = starts.numel()
    n = length // block
    q = torch.arange(length, device=starts.device)
    counts = []
    for i in range(0, length, chunk):  # whole query blocks per chunk (chunk is a multiple of block)
        sl = slice(i, min(i + chunk, length))
        seen = _overlap(starts[sl], q[sl] + 1, block, n) - _overlap(hide_lo[sl], hide_hi[sl], block, n)
        counts.append(seen.view(-1, block, n).sum(1))
    count = torch.cat(counts)  # (nq, nk): query-key pairs seen per block pair
    return (count > 0) & (count < block * block), count == block * block


def block_mask(starts: torch.Tensor, hide_lo: torch.Tensor, hide_hi: torch.Tensor, block: int = BLOCK):
    """The BlockMask of a flat sequence (see `pack_flat`): block lists from `block_lists`, and for the
    partial blocks a mask_mod that reads the same per-token intervals."""
    from torch.nn.attention.flex_attention import BlockMask

    partial, full = block_lists(starts, hide_lo, hide_hi, block)

    def lists(which: torch.Tensor):
        # the listed blocks first (a stable sort of "not listed"), then a count of them per query block
        order = torch.argsort((~which).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return which.sum(-1).to(torch.int32)[None, None], order[None, None]

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx >= starts[q_idx]) & (kv_idx <= q_idx) & ~((kv_idx >= hide_lo[q_idx]) & (kv_idx < hide_hi[q_idx]))

    num, idx = lists(partial)
    full_num, full_idx = lists(full)
    length = starts.numel()
    return BlockMask.from_kv_blocks(num, idx, full_num, full_idx, BLOCK_SIZE=block, mask_mod=mask_mod,
                                    seq_lengths=(length, length))


# --- the model's attention -------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _kernel(device_type: str):
    """flex_attention: compiled on CUDA (the fused kernel); as it is elsewhere (unfused, for tests)."""
    from torch.nn.attention.flex_attention import flex_attention

    if device_type != "cuda":
        return flex_attention
    # Every variant (dtype, grad mode, heads, head size) recompiles the one function; past dynamo's limit (8)
    # it would run flex unfused, scores T x T, out of memory on a long forward. A scorer and a trainer in one
    # process (the bench) use a handful each.
    import torch._dynamo

    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), 64))
    return torch.compile(flex_attention, dynamic=True)


def attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention signature: (B, H, T, D) query/key/value, the BlockMask as attention_mask
    -> ((B, T, H, D) output, no weights)."""
    unsupported(kwargs)
    with warnings.catch_warnings():  # CPU: "called without torch.compile()" is what we chose there
        warnings.simplefilter("ignore", UserWarning)
        out = _kernel(query.device.type)(query, key, value, block_mask=attention_mask, scale=scaling,
                                         enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None


@functools.lru_cache(maxsize=None)
def register() -> None:
    """`attention_forward` registered with transformers under NAME (once)."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, attention_forward)
