"""THE sequence log-prob function: precompute and train both reduce to `scored_logps`.

log pi(y|x) = sum over completion tokens y_t of log softmax(logits_{t-1})[y_t]. The LM head and
the log-softmax run only on the positions that are scored, in chunks, so no float32
[batch, length, vocab] tensor is ever built; the log-softmax and the sums are float64, whatever
the model's dtype, so the result does not depend on how many rows share a forward. How rows are
laid out in a batch (padded, packed) is `stages.core.scoring.packing`'s business.
"""

from __future__ import annotations

import torch

# Rows of hidden states sent through the LM head at once: 512 x 49k vocab x 4 B = 100 MB of logits.
DEFAULT_CHUNK = 512
TRAIN_CHUNK = 256  # with gradients: 256 x 49k x (4 + 8 + 8 + 4) B ~ 300 MB transient per chunk

# Config attributes of models whose logits are not a plain `lm_head(hidden)`; they take the
# full-forward path so the model's own post-processing (softcapping, scaling) applies.
_CUSTOM_HEAD_ATTRS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[label] in float64. logits (N, V), labels (N,) -> (N,)."""
    logits, labels = logits.double(), labels.to(logits.device)  # a model spread over GPUs: the head's GPU
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
    these index triplets. A model spread over GPUs (a device_map) may return its hidden states or
    logits on another GPU than the inputs': the indices follow them there, the sums come back.
    """
    if _has_plain_head(model):
        hidden = model.base_model(**inputs, use_cache=False).last_hidden_state
        rows, cols = rows.to(hidden.device), cols.to(hidden.device)
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
        picked = logits[rows.to(logits.device), cols.to(logits.device)]
        parts = [token_logps(picked[i:i + chunk_size], labels[i:i + chunk_size])
                 for i in range(0, picked.size(0), chunk_size)]
    per_token = torch.cat(parts).to(labels.device) if parts else torch.zeros(0, dtype=torch.float64,
                                                                          device=labels.device)
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
