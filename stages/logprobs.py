"""THE sequence log-prob function: precompute and train both call `sequence_logps`.

log pi(y|x) = sum over completion tokens y_t of log softmax(logits_{t-1})[y_t]. The LM head and
the log-softmax run only on the positions that are scored, in chunks, so no float32
[batch, length, vocab] tensor is ever built; the log-softmax is always float32, whatever the
model's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Rows of hidden states sent through the LM head at once: 512 x 49k vocab x 4 B = 100 MB of logits.
DEFAULT_CHUNK = 512

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


def sequence_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor,
                   chunk_size: int = DEFAULT_CHUNK, return_token_logps: bool = False):
    """Summed completion log-probs per sequence.

    input_ids, attention_mask, completion_mask: (B, T), right padded; completion_mask is 1 on the
    completion tokens to score (position 0 is never scored: nothing predicts it).
    Returns sums (B,) float64, and with return_token_logps the flat (N,) per-token values with
    their row indices.
    """
    rows, cols, labels = _scored_positions(input_ids, completion_mask)
    if _has_plain_head(model):
        hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        picked = hidden[rows, cols]  # (N, H): only the scored positions reach the LM head
        head = model.get_output_embeddings()
        parts = [token_logps(head(picked[i:i + chunk_size]), labels[i:i + chunk_size])
                 for i in range(0, picked.size(0), chunk_size)]
    else:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        picked = logits[rows, cols]
        parts = [token_logps(picked[i:i + chunk_size], labels[i:i + chunk_size])
                 for i in range(0, picked.size(0), chunk_size)]
    per_token = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64, device=input_ids.device)
    sums = torch.zeros(input_ids.size(0), dtype=torch.float64, device=input_ids.device).index_add(0, rows, per_token)
    if return_token_logps:
        return sums, per_token, rows
    return sums


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
