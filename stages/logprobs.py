"""THE sequence log-prob function: precompute and train both call `sequence_logps`.

log pi(y|x) = sum over completion tokens y_t of log softmax(logits_{t-1})[y_t]. The LM head and
the log-softmax run only on the positions that are scored, in chunks, so no float32
[batch, length, vocab] tensor is ever built; the log-softmax is always float32, whatever the
model's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from stages.tokenize import scored_sequence

# Rows of hidden states sent through the LM head at once: 512 x 49k vocab x 4 B = 100 MB of logits.
DEFAULT_CHUNK = 512
TRAIN_CHUNK = 256  # with gradients: 256 x 49k x (4 + 8 + 8 + 4) B ~ 300 MB transient per chunk

# Config attributes of models whose logits are not a plain `lm_head(hidden)`; they take the
# full-forward path so the model's own post-processing (softcapping, scaling) applies.
_CUSTOM_HEAD_ATTRS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[label] in float64. logits (N, V), labels (N,) -> (N,)."""
    logits = logits.double()
    return logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def _has_plain_head(model) -> bool:
    cfg = getattr(model, "config", None)
    if cfg is None or model.get_output_embeddings() is None:
        return False
    for attr in _CUSTOM_HEAD_ATTRS:
        value = getattr(cfg, attr, None)
        if value not in (None, 1, 1.0):
            return False
    return True


def _scored_positions(input_ids: torch.Tensor, completion_mask: torch.Tensor):
    """Where each scored token is predicted from: (row, position t-1, label y_t)."""
    target = completion_mask[:, 1:].bool()  # (B, T-1): token t+1 scored from position t
    rows = torch.arange(input_ids.size(0), device=input_ids.device).unsqueeze(1).expand_as(target)[target]
    cols = torch.arange(input_ids.size(1) - 1, device=input_ids.device).unsqueeze(0).expand_as(target)[target]
    labels = input_ids[:, 1:][target]
    return rows, cols, labels


def scored_logps(model, inputs: dict, rows: torch.Tensor, cols: torch.Tensor, labels: torch.Tensor,
                 seq_ids: torch.Tensor, n_seqs: int, chunk_size: int = DEFAULT_CHUNK) -> torch.Tensor:
    """The core: one forward of `inputs`, then label k scored from the output at (rows[k], cols[k])
    and summed into sequence seq_ids[k]. Returns sums (n_seqs,) float64.

    Layout-agnostic: right-padded batches and packed prompt/chosen/rejected rows both reduce to
    these index triplets.
    """
    if _has_plain_head(model):
        hidden = model.base_model(**inputs, use_cache=False).last_hidden_state
        picked = hidden[rows, cols]  # (N, H): only the scored positions reach the LM head
        head = model.get_output_embeddings()
        score = lambda h, y: token_logps(head(h), y)  # noqa: E731
        if torch.is_grad_enabled() and picked.requires_grad:
            # Training: recompute each chunk's logits in backward instead of keeping them all, and
            # use small chunks: backward of one holds its logits, their float64 copy and gradients.
            from torch.utils.checkpoint import checkpoint

            score = lambda h, y, f=score: checkpoint(f, h, y, use_reentrant=False)  # noqa: E731
            chunk_size = min(chunk_size, TRAIN_CHUNK)
        parts = [score(picked[i:i + chunk_size], labels[i:i + chunk_size])
                 for i in range(0, picked.size(0), chunk_size)]
    else:
        logits = model(**inputs, use_cache=False).logits
        picked = logits[rows, cols]
        parts = [token_logps(picked[i:i + chunk_size], labels[i:i + chunk_size])
                 for i in range(0, picked.size(0), chunk_size)]
    per_token = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64, device=labels.device)
    return torch.zeros(n_seqs, dtype=torch.float64, device=labels.device).index_add(0, seq_ids, per_token)


def sequence_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor,
                   chunk_size: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Summed completion log-probs per sequence of a right-padded batch.

    input_ids, attention_mask, completion_mask: (B, T); completion_mask is 1 on the completion
    tokens to score (position 0 is never scored: nothing predicts it). Returns sums (B,) float64.
    """
    rows, cols, labels = _scored_positions(input_ids, completion_mask)
    return scored_logps(model, {"input_ids": input_ids, "attention_mask": attention_mask}, rows, cols, labels, rows,
                        input_ids.size(0), chunk_size)


def supports_4d_mask(model) -> bool:
    """Whether the model's attention takes an arbitrary 4D mask (sdpa, eager; not flash kernels)."""
    return getattr(getattr(model, "config", None), "_attn_implementation", "sdpa") in ("sdpa", "eager")


def pair_rows(j: int, prompt_ids: list[int], chosen_ids: list[int], rejected_ids: list[int],
              max_length: int | None, truncation_mode: str) -> list[tuple]:
    """Pair j as rows for `pack_rows`: (prefix, first, second, seq of first, seq of second).

    Sequence 2j is the chosen answer, 2j+1 the rejected one. When truncation keeps the whole prompt
    for both answers, one row holds prompt + chosen + rejected and the prompt is run once; otherwise
    (keep_end cut the prompt differently for each answer) each answer is a row of its own.
    """
    c_seq, c_start = scored_sequence(prompt_ids, chosen_ids, max_length, truncation_mode)
    r_seq, r_start = scored_sequence(prompt_ids, rejected_ids, max_length, truncation_mode)
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


def exact_logps(model, sequence: list[int], start: int) -> float:
    """The oracle: one unpadded forward of one sequence, full log-softmax, sum from `start`.

    The logits are the model's (float32 for a float32 model); log-softmax and sum run in float64
    so the oracle's own rounding stays far below the tolerances it checks.
    """
    ids = torch.tensor([sequence], dtype=torch.long)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1].double()  # (T-1, V)
    logps = F.log_softmax(logits, dim=-1).gather(-1, ids[0, 1:].unsqueeze(-1)).squeeze(-1)
    return float(logps[max(start, 1) - 1:].sum())
