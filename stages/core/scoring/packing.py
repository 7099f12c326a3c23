"""Batch layout for scoring: the rows a forward runs, and how a scorer call is cut into forwards.

Two layouts reduce to the index triplets of `logprobs.scored_logps`:
- packed (the default): one row per pair, prompt + chosen + rejected, the prompt run once, with a
  4D mask that hides chosen from rejected and positions that restart after the prompt;
- padded: each (prompt + completion) a right-padded sequence of its own, for attention kernels
  that take no 4D mask (flash attention).
"""

from __future__ import annotations

import torch

from stages.core.scoring.truncation import Truncation

# Padded tokens per forward pass: sequences are sorted by length and grouped under this budget,
# so short sequences are not padded to the longest of the whole batch. The CPU's budget; on CUDA
# `forward_budget` sizes it from the model and free memory, up to GPU_TOKENS_PER_FORWARD (an H200
# scored a 1B model 2.15x faster at 65,536 tokens a forward than at 8,192; 131,072 was slower again).
TOKENS_PER_FORWARD = 8192
GPU_TOKENS_PER_FORWARD = 65536
# Pairs per scorer call when --batch-size is not given: a call's pairs are cut into forwards, so a GPU's
# bigger forwards need bigger calls (an H200 scored 2.15x faster at 256 pairs a call than at 64).
PAIRS_PER_CALL = {"cpu": 64, "cuda": 512}
# Share of the GPU's free memory one forward's transient activations may take.
GPU_MEMORY_SHARE = 0.25
# Packed rows carry a (T, T) additive mask each: at most this many mask entries per forward (128 MB fp32).
MASK_ELEMENTS = 2 ** 25


# What one more forward costs, in padded tokens: per-call overhead and small-matmul inefficiency.
# Small on CPU; a GPU wants few, large forwards.
FORWARD_OVERHEAD_TOKENS = {"cpu": 64, "cuda": 2048}


def plan_forwards(widths: list[int], tokens_per_forward: int, mask_elements: int | None,
                  overhead_tokens: int) -> list[list[int]]:
    """Sort rows by width and cut them into forwards of contiguous widths that minimise padded
    tokens + `overhead_tokens` per forward (exact, by dynamic programming over the cut points),
    each forward under the padded-token budget and, for packed rows, the (T, T) mask budget.
    """
    order = sorted(range(len(widths)), key=lambda i: widths[i])
    w = [widths[i] for i in order]
    n = len(w)
    best, cut = [0.0] + [float("inf")] * n, [0] * (n + 1)
    for j in range(1, n + 1):  # rows order[:j] planned; the last forward is order[i:j], padded to w[j-1]
        for i in range(j - 1, -1, -1):
            k = j - i
            if k > 1 and (k * w[j - 1] > tokens_per_forward
                          or (mask_elements is not None and k * w[j - 1] ** 2 > mask_elements)):
                break
            cost = best[i] + k * w[j - 1] + overhead_tokens
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], n
    while j > 0:
        groups.append(order[cut[j]:j])
        j = cut[j]
    return groups[::-1]


def forward_budget(free_bytes: int, hidden: int, intermediate: int, dtype_bytes: int) -> int:
    """Tokens per forward on a GPU: the largest power of two whose transient activations (one layer at a
    time, as in inference: q, k, v, o and the MLP's three projections per token) fit GPU_MEMORY_SHARE of
    the free memory, between TOKENS_PER_FORWARD and GPU_TOKENS_PER_FORWARD."""
    per_token = dtype_bytes * (4 * hidden + 3 * intermediate)
    fit = int(free_bytes * GPU_MEMORY_SHARE) // max(per_token, 1)
    budget = TOKENS_PER_FORWARD
    while budget * 2 <= min(fit, GPU_TOKENS_PER_FORWARD):
        budget *= 2
    return budget


def tokens_per_forward_for(model, device: str) -> int:
    """The default forward budget of `model` on `device` ("cpu": TOKENS_PER_FORWARD; "cuda": `forward_budget`)."""
    if device != "cuda":
        return TOKENS_PER_FORWARD
    cfg = model.config
    hidden = getattr(cfg, "hidden_size", 4096)
    free, _ = torch.cuda.mem_get_info()
    return forward_budget(free, hidden, getattr(cfg, "intermediate_size", None) or 4 * hidden,
                          next(model.parameters()).element_size())


def plan_flat(widths: list[int], tokens_per_forward: int) -> list[list[int]]:
    """Rows for the flex path (`flex.pack_flat`: end to end, no padding between them) cut into forwards of
    at most `tokens_per_forward` tokens: rows sorted by width, longest first, each into the first forward
    with room (a row over the budget alone). A row's values do not depend on its neighbours."""
    order = sorted(range(len(widths)), key=lambda i: -widths[i])
    groups: list[list[int]] = []
    room: list[int] = []
    for i in order:
        at = next((g for g, r in enumerate(room) if r >= widths[i]), None)
        if at is None:
            groups.append([])
            room.append(tokens_per_forward)
            at = len(groups) - 1
        groups[at].append(i)
        room[at] -= widths[i]
    return groups


def supports_4d_mask(model) -> bool:
    """Whether the model's attention takes an arbitrary 4D mask (sdpa, eager; not flash kernels)."""
    return getattr(getattr(model, "config", None), "_attn_implementation", "sdpa") in ("sdpa", "eager")


def pair_rows(j: int, prompt_ids: list[int], chosen_ids: list[int], rejected_ids: list[int],
              truncation: Truncation) -> list[tuple]:
    """Pair j as rows for `pack_rows`: (prefix, first, second, seq of first, seq of second).

    Sequence 2j is the chosen answer, 2j+1 the rejected one. When truncation keeps the whole prompt
    for both answers, one row holds prompt + chosen + rejected and the prompt is run once; otherwise
    (keep_end cut the prompt differently for each answer) each answer is a row of its own.
    """
    c_seq, c_start = truncation.scored_sequence(prompt_ids, chosen_ids)
    r_seq, r_start = truncation.scored_sequence(prompt_ids, rejected_ids)
    p = len(prompt_ids)
    if p > 0 and c_start == r_start == p:
        return [(list(prompt_ids), c_seq[p:], r_seq[p:], 2 * j, 2 * j + 1)]
    rows = []
    for seq, start, sid in ((c_seq, c_start, 2 * j), (r_seq, r_start, 2 * j + 1)):
        cut = max(start, 1)  # the first token has no context: never scored
        rows.append((seq[:cut], seq[cut:], [], sid, sid))
    return rows


def row_width(row: tuple) -> int:
    return len(row[0]) + len(row[1]) + len(row[2])


def pack_rows(rows: list[tuple], pad_id: int, dtype: torch.dtype, device=None):
    """Rows (prefix, first, second, seq_first, seq_second) -> one right-padded forward in which the
    prefix is run once for both continuations: `second` is masked from `first` and positioned right
    after the prefix, so each row computes exactly what two separate sequences would (a 4D additive
    mask; padding positions attend to themselves). `second` may be empty.

    Returns (inputs, rows, cols, labels, seq_ids) for `scored_logps`. Every prefix must be non-empty.
    """
    width = max(row_width(r) for r in rows)
    n = len(rows)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    pos = torch.zeros((n, width), dtype=torch.long)
    allow = torch.zeros((n, width, width), dtype=torch.bool)
    causal = torch.ones((width, width), dtype=torch.bool).tril()
    rows_, cols, labels, seq_ids = [], [], [], []
    for j, (p, c, r, sc, sr) in enumerate(rows):
        lp, lc, lr = len(p), len(c), len(r)
        length = lp + lc + lr
        ids[j, :length] = torch.tensor(list(p) + list(c) + list(r), dtype=torch.long)
        pos[j, :length] = torch.cat([torch.arange(lp + lc), torch.arange(lp, lp + lr)])
        allow[j, :length, :length] = causal[:length, :length]
        allow[j, lp + lc:length, lp:lp + lc] = False  # second never sees first
        idx = torch.arange(length, width)
        allow[j, idx, idx] = True  # padding positions: one key each, so no NaN (their outputs are unused)
        rows_ += [j] * (lc + lr)
        labels += list(c) + list(r)
        cols += range(lp - 1, lp + lc - 1)  # first's token k at lp + k, predicted from lp + k - 1
        if lr:  # second's first token is predicted from the prefix's last position
            cols += [lp - 1, *range(lp + lc, lp + lc + lr - 1)]
        seq_ids += [sc] * lc + [sr] * lr
    mask = torch.zeros((n, 1, width, width), dtype=dtype).masked_fill(~allow.unsqueeze(1), torch.finfo(dtype).min)
    t = lambda v: torch.tensor(v, dtype=torch.long, device=device)  # noqa: E731
    inputs = {"input_ids": ids.to(device), "attention_mask": mask.to(device), "position_ids": pos.to(device)}
    return inputs, t(rows_), t(cols), t(labels), t(seq_ids)


def pad_batch(sequences: list[list[int]], starts: list[int], pad_id: int, device=None):
    """Right-pad sequences; completion_mask marks positions >= start. -> three (B, T) long tensors."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    completion_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, (seq, start) in enumerate(zip(sequences, starts)):
        input_ids[i, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention_mask[i, :len(seq)] = 1
        completion_mask[i, start:len(seq)] = 1
    return input_ids.to(device), attention_mask.to(device), completion_mask.to(device)
