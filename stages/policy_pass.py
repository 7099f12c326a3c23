"""One pass of the policy over shard pairs: log-probs, loss, and the metrics people watch.

Shared by training (with backward), in-training evaluation and `pipeline.py eval`. Sums are kept
per metric so workers can add them with one all-reduce before dividing.
"""

from __future__ import annotations

import torch

from stages.logprobs import (pack_rows, pad_batch, pair_rows, row_width, scored_logps, sequence_logps,
                             supports_4d_mask)
from stages.losses import Batch, combined_loss, rewards
from stages.tokenize import scored_sequence

# Per-pair means reported as metrics; kl/* are mean log(pi/pi_ref) over the data's completions,
# an estimate of KL(pi || pi_ref) on chosen and rejected answers.
PAIR_MEANS = ["loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
              "logps/chosen", "logps/rejected", "kl/chosen", "kl/rejected"]
# Extra sums: pairs, tokens in the forward, completion tokens and log-ratio sums (per-token KL).
COUNTS = ["pairs", "tokens", "chosen_tokens", "rejected_tokens"]
SUM_KEYS = PAIR_MEANS + COUNTS


def forward(model, pairs: list[dict], ctx: dict):
    """Policy log-probs of chosen and rejected in one forward -> (chosen (m,), rejected (m,), tokens run).

    Packed (the default where attention takes a 4D mask): each pair is one row, prompt + chosen +
    rejected, the prompt run once; otherwise chosen and rejected as right-padded sequences.
    """
    manifest, device, m = ctx["manifest"], ctx["device"], len(pairs)
    max_length, mode = manifest["max_length"], manifest["truncation_mode"]
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=ctx["dtype"] == "bfloat16")
    if ctx.get("pack_prompts", True) and supports_4d_mask(model):
        rows = [row for j, p in enumerate(pairs)
                for row in pair_rows(j, p["prompt_ids"], p["chosen_ids"], p["rejected_ids"], max_length, mode)]
        inputs, r, c, labels, seq_ids = pack_rows(rows, ctx["pad_id"], torch.float32, device)
        with autocast:
            logps = scored_logps(model, inputs, r, c, labels, seq_ids, 2 * m)
        return logps[0::2], logps[1::2], sum(row_width(row) for row in rows)
    seqs, starts = [], []
    for key in ("chosen_ids", "rejected_ids"):
        for p in pairs:
            seq, start = scored_sequence(p["prompt_ids"], p[key], max_length, mode)
            seqs.append(seq)
            starts.append(start)
    ids, mask, comp = pad_batch(seqs, starts, ctx["pad_id"], device)
    with autocast:
        logps = sequence_logps(model, ids, mask, comp)
    return logps[:m], logps[m:], int(mask.sum())


def loss_batch(pairs: list[dict], chosen, rejected, total_chosen_tokens: float) -> Batch:
    t = lambda key: torch.tensor([p[key] for p in pairs], dtype=torch.float64, device=chosen.device)  # noqa: E731
    return Batch(chosen, rejected, t("ref_chosen_logps"), t("ref_rejected_logps"), t("chosen_scored_tokens"),
                 t("rejected_scored_tokens"), total_chosen_tokens)


def run_pairs(model, pairs: list[dict], batch_size_total: int, ctx: dict, train: bool) -> torch.Tensor:
    """Forward (and backward, scaled for the whole optimizer batch) in micro-batches -> sums (SUM_KEYS,)."""
    sums = torch.zeros(len(SUM_KEYS), dtype=torch.float64)
    # Micro-batches of similar lengths pad less. Every loss is per pair and the step's gradient a
    # sum over pairs, so how pairs are grouped into micro-batches does not change it.
    pairs = sorted(pairs, key=lambda p: len(p["prompt_ids"]) + len(p["chosen_ids"]) + len(p["rejected_ids"]))
    for i in range(0, len(pairs), ctx["micro"]):
        micro = pairs[i:i + ctx["micro"]]
        with torch.set_grad_enabled(train):
            chosen, rejected, tokens = forward(model, micro, ctx)
            b = loss_batch(micro, chosen, rejected, ctx["batch_chosen_tokens"])
            per_pair = combined_loss(b, ctx["params"], ctx["terms"])
            if train:
                (per_pair.sum() / batch_size_total).backward()
        r = rewards(b, ctx["params"])
        values = {"loss": per_pair.detach().sum(), "kl/chosen": b.chosen_logratios.detach().sum(),
                  "kl/rejected": b.rejected_logratios.detach().sum(), "pairs": len(micro), "tokens": tokens,
                  "chosen_tokens": b.chosen_tokens.sum(), "rejected_tokens": b.rejected_tokens.sum(),
                  **{k: r[k].sum() for k in PAIR_MEANS if k in r}}
        sums += torch.tensor([float(values[k]) for k in SUM_KEYS], dtype=torch.float64)
    return sums


def means(sums: torch.Tensor, prefix: str = "") -> dict:
    """Metric means from summed values; per-token KL divides by completion tokens."""
    s = dict(zip(SUM_KEYS, sums.tolist()))
    n = max(s["pairs"], 1.0)
    out = {prefix + k: s[k] / n for k in PAIR_MEANS}
    out[prefix + "kl_per_token/chosen"] = s["kl/chosen"] / max(s["chosen_tokens"], 1.0)
    out[prefix + "kl_per_token/rejected"] = s["kl/rejected"] / max(s["rejected_tokens"], 1.0)
    return out


def evaluate(model, refs, ctx: dict, rank: int = 0, world: int = 1, reduce=lambda t: t) -> dict:
    """Metrics over every pair of a held-out set, in a fixed order; `reduce` sums across workers."""
    from stages import shards

    was_training = model.training
    model.eval()
    sums = torch.zeros(len(SUM_KEYS), dtype=torch.float64)
    pairs = [p for i, p in enumerate(shards.epoch_pairs(refs, 0, 0, 1)) if i % world == rank]
    ctx = {**ctx, "manifest": refs.manifest}
    with torch.no_grad():
        for i in range(0, len(pairs), ctx["micro"]):
            chunk = pairs[i:i + ctx["micro"]]
            ctx["batch_chosen_tokens"] = float(sum(p["chosen_scored_tokens"] for p in chunk))
            sums += run_pairs(model, chunk, len(chunk), ctx, train=False)
    if was_training:
        model.train()
    return means(reduce(sums), "eval/")
