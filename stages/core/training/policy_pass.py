"""One pass of the policy over shard pairs: log-probs, loss, and the metrics people watch.

Shared by training (with backward), in-training evaluation and `pipeline.py eval`. Sums are kept
per metric so workers can add them with one all-reduce before dividing.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch
from transformers import PreTrainedModel

from stages.core.config.engine import ConfigError
from stages.core.config.options import PolicyPass
from stages.core.lease import check_held
from stages.core.refs.manifest import Manifest
from stages.core.refs.stream import Refs, check_tokenizer, epoch_pairs
from stages.core.runtime.models import load_model, load_tokenizer, tokenizer_hashes
from stages.core.scoring import attention as attention_setting
from stages.core.scoring.logprobs import scored_logps, sequence_logps
from stages.core.scoring.packing import pack_rows, pad_batch, pair_rows, row_width
from stages.core.scoring.truncation import Truncation
from stages.core.training.losses import Batch, LossParams, combined_loss, rewards
from stages.core.training.unpaired_losses import (
    KL_LOSSES,
    UNPAIRED_LOSSES,
    UNPAIRED_SUM_KEYS,
    UnpairedBatch,
    UnpairedParams,
    kl_estimate,
    unpaired_metrics,
    unpaired_rewards,
)

# Per-pair means reported as metrics. logratio/* is the mean log(pi/pi_ref) of the data's chosen and
# rejected answers: how far the policy moved on them. It is not a KL (the answers are not samples of
# the policy) and can be negative; eval estimates KL(pi || pi_ref) from policy samples.
PAIR_MEANS = ["loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
              "logps/chosen", "logps/rejected", "logratio/chosen", "logratio/rejected"]
# Extra sums: pairs, tokens in the forward, completion tokens and log-ratio sums (per-token KL).
COUNTS = ["pairs", "tokens", "chosen_tokens", "rejected_tokens"]
SUM_KEYS = PAIR_MEANS + COUNTS
# Unpaired examples (KTO): the loss, TRL's reward and log-prob sums per class and the class counts, then
# examples and tokens; the KL estimate is the step's, not a sum.
UNPAIRED_KEYS = ["loss", *UNPAIRED_SUM_KEYS, "pairs", "tokens"]


@dataclass(frozen=True)
class PassContext:
    """Everything a pass needs besides the model and the pairs; built once by `pass_context`."""

    micro_batch_size: int                  # pairs per forward
    truncation: Truncation                 # the shards' truncation rule (manifest), applied as precompute did
    pad_id: int
    device: str
    dtype: str                             # "bfloat16": autocast over float32 weights
    terms: tuple[tuple[str, float], ...]   # (loss name, weight)
    params: LossParams
    pack_prompts: bool = True
    unpaired: UnpairedParams | None = None  # set for the losses on unpaired examples (KTO shards)
    attention: str = "auto"                # packed rows: "dense", "flex", "varlen" or "auto" (attention.resolve)
    micro_batch_tokens: int | None = None  # set: micro-batches fill this many tokens (`micro_batches`)

    @property
    def sum_keys(self) -> list[str]:
        return UNPAIRED_KEYS if self.unpaired is not None else SUM_KEYS

    @property
    def needs_kl(self) -> bool:
        """Whether a step first estimates the KL term over its batch (KTO)."""
        return self.unpaired is not None and self.terms[0][0] in KL_LOSSES

    def for_refs(self, refs: Refs) -> PassContext:
        """The same pass over another precompute output (its own truncation rule)."""
        return dataclasses.replace(self, truncation=refs.manifest.truncation)


def pass_context(cfg: PolicyPass, manifest: Manifest, pad_id: int, device: str) -> PassContext:
    """The one way to build a PassContext: from a train or eval config and the shards' manifest
    (its `truncation`: the pass cuts sequences as the precompute did)."""
    params = LossParams(cfg.beta, cfg.label_smoothing, cfg.discopop_tau, cfg.simpo_gamma)
    terms = tuple(cfg.loss_terms)
    unpaired = terms[0][0] in UNPAIRED_LOSSES
    kind = manifest.kind
    if unpaired != (kind == "unpaired"):
        wants = "unpaired examples (KTO shards)" if unpaired else "preference pairs"
        other = "--loss-type " + " or ".join(UNPAIRED_LOSSES) if kind == "unpaired" else "a pair loss (sigmoid, ...)"
        raise ConfigError(f"loss {cfg.loss_type!r} takes {wants}, and the shards hold {kind} data (manifest kind "
                          f"{kind!r}): use {other}, or shards of the other kind")
    return PassContext(cfg.micro_batch_size, manifest.truncation, pad_id,
                       device, cfg.dtype, terms, params, cfg.pack_prompts,
                       UnpairedParams(cfg.beta, cfg.desirable_weight, cfg.undesirable_weight) if unpaired else None,
                       cfg.attention, getattr(cfg, "micro_batch_tokens", None))


def load_policy(model_path: str, refs: Refs, device: str):
    """(tokenizer, float32 model) of a policy whose tokenizer is the one that made the shards."""
    tokenizer = load_tokenizer(model_path)
    check_tokenizer(refs, tokenizer_hashes(tokenizer))
    return tokenizer, load_model(model_path, "float32", device)


def attention_path(model, ctx: PassContext, backward: bool) -> str:
    """The attention path `forward` takes for `model` (a transformers model) under `ctx`."""
    device = "cuda" if str(ctx.device).startswith("cuda") else "cpu"
    return attention_setting.resolve(ctx.attention, device, model, backward=backward) if ctx.pack_prompts else "dense"


def policy_of(model) -> PreTrainedModel:
    """The transformers model inside a training wrapper (PolicyCall, under DDP or FSDP2), or the model itself."""
    inner = getattr(model, "module", model)  # DDP keeps the wrapped module here
    return getattr(inner, "policy", inner)


def held_attention(model, ctx: PassContext, backward: bool):
    """The attention path of `model` (or the policy in its wrapper) held for a block that runs forwards AND
    their backward: the activation-checkpointing recompute in backward must reach the same attention."""
    policy = policy_of(model)
    return attention_setting.attention_in(policy, attention_path(policy, ctx, backward))


def forward(model, pairs: list[dict], ctx: PassContext) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Policy log-probs of chosen and rejected in one forward -> (chosen (m,), rejected (m,), tokens run).

    Packed (the default where attention takes a 4D mask): each pair is one row, prompt + chosen +
    rejected, the prompt run once; on the flex and varlen paths (`ctx.attention`) the rows lie end to end
    in one sequence; otherwise chosen and rejected as right-padded sequences. A backward outside this call
    must run under `held_attention` (run_pairs does).
    """
    m = len(pairs)
    autocast = torch.autocast(device_type=ctx.device, dtype=torch.bfloat16, enabled=ctx.dtype == "bfloat16")
    path = attention_path(model, ctx, torch.is_grad_enabled())
    if attention_setting.packs(path, model, ctx.pack_prompts):
        rows = [row for j, p in enumerate(pairs) for row in
                pair_rows(j, p["prompt_ids"], p["chosen_ids"], p["rejected_ids"], ctx.truncation)]
        if path in attention_setting.FLAT:
            inputs, r, c, labels, seq_ids = attention_setting.pack(path, rows, ctx.pad_id, ctx.device)
        else:
            inputs, r, c, labels, seq_ids = pack_rows(rows, ctx.pad_id, torch.float32, ctx.device)
        with autocast, attention_setting.attention_in(model, path):
            logps = scored_logps(model, inputs, r, c, labels, seq_ids, 2 * m)
        # Copies, not views: FSDP2 warns about (and in-place ops on) views a wrapped forward returns.
        return logps[0::2].clone(), logps[1::2].clone(), sum(row_width(row) for row in rows)
    seqs, starts = [], []
    for key in ("chosen_ids", "rejected_ids"):
        for p in pairs:
            seq, start = ctx.truncation.scored_sequence(p["prompt_ids"], p[key])
            seqs.append(seq)
            starts.append(start)
    ids, mask, comp = pad_batch(seqs, starts, ctx.pad_id, ctx.device)
    with autocast:
        logps = sequence_logps(model, ids, mask, comp)
    return logps[:m].clone(), logps[m:].clone(), int(mask.sum())


def loss_batch(pairs: list[dict], chosen: torch.Tensor, rejected: torch.Tensor, total_chosen_tokens: float) -> Batch:
    t = lambda key: torch.tensor([p[key] for p in pairs], dtype=torch.float64, device=chosen.device)  # noqa: E731
    return Batch(chosen, rejected, t("ref_chosen_logps"), t("ref_rejected_logps"), t("chosen_scored_tokens"),
                 t("rejected_scored_tokens"), total_chosen_tokens)


def unpaired_batch(pairs: list[dict], chosen: torch.Tensor, rejected: torch.Tensor) -> UnpairedBatch:
    """Examples in the shape of pairs (`shard_stream.as_pair`): chosen is the completion, rejected the KL one."""
    t = lambda key: torch.tensor([p[key] for p in pairs], dtype=torch.float64, device=chosen.device)  # noqa: E731
    return UnpairedBatch(chosen, t("ref_chosen_logps"), rejected, t("ref_rejected_logps"),
                         torch.tensor([bool(p["label"]) for p in pairs], device=chosen.device))


def _unpaired_sums(b: UnpairedBatch, per_example: torch.Tensor, ctx: PassContext, tokens: int) -> torch.Tensor:
    r = unpaired_rewards(b, ctx.unpaired, 0.0)
    values = {"loss": per_example.detach().sum(), "pairs": per_example.numel(), "tokens": tokens,
              **{k: r[k] for k in UNPAIRED_SUM_KEYS}}
    return torch.tensor([float(values[k]) for k in UNPAIRED_KEYS], dtype=torch.float64)


def _length(p: dict) -> int:
    return len(p["prompt_ids"]) + len(p["chosen_ids"]) + len(p["rejected_ids"])


def pair_width(p: dict, packed: bool) -> int:
    """Tokens a pair takes in a forward: one packed row (prompt once), or two rows of the longer answer."""
    prompt = len(p["prompt_ids"])
    return _length(p) if packed else 2 * (prompt + max(len(p["chosen_ids"]), len(p["rejected_ids"])))


def micro_batches(pairs: list[dict], ctx: PassContext) -> list[list[dict]]:
    """The pass's micro-batches. Without a token budget, `micro_batch_size` pairs each, in the given order.
    With `micro_batch_tokens`, pairs sorted by length and cut, in that order, where the next pair would take
    the micro-batch's padded tokens (pairs x the widest pair's width) over the budget; a pair wider than the
    budget goes alone. Short pairs then share a forward by the dozen and long ones are not stacked into an
    out-of-memory one. Every loss is per pair and a step's gradient is their sum, so the grouping changes
    no value beyond rounding."""
    budget = ctx.micro_batch_tokens
    if budget is None:
        return [pairs[i:i + ctx.micro_batch_size] for i in range(0, len(pairs), ctx.micro_batch_size)]
    groups: list[list[dict]] = []
    widest = 0
    for p in sorted(pairs, key=_length):
        width = pair_width(p, ctx.pack_prompts)
        if groups and (len(groups[-1]) + 1) * max(widest, width) <= budget:
            groups[-1].append(p)
            widest = max(widest, width)
        else:
            groups.append([p])
            widest = width
    return groups


def rounds_for(batch: list[dict], world: int, ctx: PassContext) -> int:
    """Micro-batches every worker runs for an optimizer batch dealt `batch[rank::world]`: the most any worker
    has (every worker knows the whole batch, so they agree without asking each other)."""
    if ctx.micro_batch_tokens is None:
        return math.ceil(math.ceil(len(batch) / world) / ctx.micro_batch_size)
    return max(len(micro_batches(batch[r::world], ctx)) for r in range(world))


def kl_sums(model, pairs: list[dict], ctx: PassContext, rounds: int | None = None,
            ghost: list[dict] | None = None) -> torch.Tensor:
    """(sum, count) of log pi(y'|x) - log pi_ref(y'|x) over the examples that have a KL completion, without
    gradients: a step adds them over its workers and then takes KTO's KL estimate (`kl_estimate`). With
    workers every one runs `rounds` forwards (a ghost at weight zero), as in `run_pairs`."""
    out = torch.zeros(2, dtype=torch.float64)
    micros = micro_batches(pairs, ctx)
    rounds = len(micros) if rounds is None else rounds
    with torch.no_grad():
        for k in range(rounds):
            micro = micros[k] if k < len(micros) else ghost
            _, rejected, _ = _score(model, micro, ctx)
            if k < len(micros):
                has = torch.tensor([bool(p["kl"]) for p in micro], device=rejected.device)
                ref = torch.tensor([p["ref_rejected_logps"] for p in micro], dtype=torch.float64,
                                   device=rejected.device)
                out += torch.stack([torch.where(has, rejected.double() - ref, 0.0).sum().cpu(),
                                    has.sum().double().cpu()])
    return out


def _losses(micro: list[dict], chosen: torch.Tensor, rejected: torch.Tensor, ctx: PassContext, chosen_tokens: float,
            kl: float, tokens: int) -> tuple[torch.Tensor, Callable[[], torch.Tensor]]:
    """(per-example loss, its contribution to `ctx.sum_keys` on demand) for one micro-batch: pairs, or
    unpaired examples whose KL estimate `kl` is fixed for the pass."""
    if ctx.unpaired is not None:
        u = unpaired_batch(micro, chosen, rejected)
        per_example = UNPAIRED_LOSSES[ctx.terms[0][0]](u, ctx.unpaired, kl)
        return per_example, lambda: _unpaired_sums(u, per_example, ctx, tokens)
    b = loss_batch(micro, chosen, rejected, chosen_tokens)
    per_pair = combined_loss(b, ctx.params, list(ctx.terms))
    return per_pair, lambda: _micro_sums(b, per_pair, ctx, tokens)


def _micro_sums(b: Batch, per_pair: torch.Tensor, ctx: PassContext, tokens: int) -> torch.Tensor:
    """One micro-batch's contribution to SUM_KEYS."""
    r = rewards(b, ctx.params)
    values = {"loss": per_pair.detach().sum(), "logratio/chosen": b.chosen_logratios.detach().sum(),
              "logratio/rejected": b.rejected_logratios.detach().sum(), "pairs": per_pair.numel(), "tokens": tokens,
              "chosen_tokens": b.chosen_tokens.sum(), "rejected_tokens": b.rejected_tokens.sum(),
              **{k: r[k].sum() for k in PAIR_MEANS if k in r}}
    return torch.tensor([float(values[k]) for k in SUM_KEYS], dtype=torch.float64)


def _score(model, micro: list[dict], ctx: PassContext):
    """`forward` on a transformers model, or through the DDP / FSDP2 wrapper (`parallel.PolicyCall`)."""
    if isinstance(model, PreTrainedModel):
        return forward(model, micro, ctx)
    return model(forward, micro, ctx)


def run_pairs(model, pairs: list[dict], ctx: PassContext, batch_size_total: float, batch_chosen_tokens: float,
              train: bool, rounds: int | None = None, ghost: list[dict] | None = None, kl: float = 0.0) -> torch.Tensor:
    """Forward (and backward, scaled for the whole optimizer batch) in micro-batches -> sums (SUM_KEYS,).

    `batch_size_total` and `batch_chosen_tokens` describe the whole optimizer batch over all
    workers: gradients are scaled by them so that summing over workers gives the batch mean.
    `model` is a transformers model or its training wrapper (`stages.core.training.parallel`). With
    workers, `rounds` is the number of micro-batches every worker runs: a worker with fewer pairs
    runs `ghost` (any pair) at weight zero, so each runs the same collectives; gradients are synced
    on the last round only.
    """
    from stages.core.training.parallel import grad_sync

    sums = torch.zeros(len(ctx.sum_keys), dtype=torch.float64)
    # Micro-batches of similar lengths pad less. Every loss is per pair and the step's gradient a
    # sum over pairs, so how pairs are grouped into micro-batches does not change it.
    micros = micro_batches(sorted(pairs, key=_length), ctx)
    rounds = len(micros) if rounds is None else rounds
    if rounds < len(micros):  # a caller's round count that would leave pairs out
        raise RuntimeError(f"{len(micros)} micro-batches for {rounds} rounds")
    for k in range(rounds):
        micro, weight = (micros[k], 1.0) if k < len(micros) else (ghost, 0.0)
        with torch.set_grad_enabled(train), grad_sync(model, not train or k == rounds - 1), \
                held_attention(model, ctx, train):
            chosen, rejected, tokens = _score(model, micro, ctx)
            # KTO: `kl`, the step's KL estimate, was fixed before this pass (`kl_sums`)
            per_pair, micro_sums = _losses(micro, chosen, rejected, ctx, batch_chosen_tokens, kl, tokens)
            if train:
                (per_pair.sum() * (weight / batch_size_total)).backward()
        if weight:
            sums += micro_sums()
    return sums


def metrics_of(sums: torch.Tensor, ctx: PassContext, prefix: str = "", kl: float = 0.0) -> dict:
    """The metrics of a pass from its summed values: `means` for pairs; for unpaired examples TRL's KTO
    metrics (per-class means, margins, kl) with the loss averaged over examples."""
    if ctx.unpaired is None:
        return means(sums, prefix)
    s = dict(zip(UNPAIRED_KEYS, sums.tolist()))
    out = {"loss": s["loss"] / max(s["pairs"], 1.0), **unpaired_metrics({**s, "kl": kl})}
    return {prefix + k: v for k, v in out.items()}


def means(sums: torch.Tensor, prefix: str = "") -> dict:
    """Metric means from summed values; per-token log-ratios divide by completion tokens."""
    s = dict(zip(SUM_KEYS, sums.tolist()))
    n = max(s["pairs"], 1.0)
    out = {prefix + k: s[k] / n for k in PAIR_MEANS}
    out[prefix + "logratio_per_token/chosen"] = s["logratio/chosen"] / max(s["chosen_tokens"], 1.0)
    out[prefix + "logratio_per_token/rejected"] = s["logratio/rejected"] / max(s["rejected_tokens"], 1.0)
    return out


def _chunks(pairs: Iterable[dict], size: int, rank: int, world: int) -> Iterator[tuple[list[dict], list[dict]]]:
    """(this worker's pairs, the group's first pair) per group of `size * world` pairs, streamed:
    every worker gets one chunk per group (at the end, maybe an empty one: it runs the first pair
    as a ghost), so all run the same number of forwards, as FSDP2's gathers need."""
    group: list[dict] = []
    for p in pairs:
        group.append(p)
        if len(group) == size * world:
            yield group[rank::world], group[:1]
            group = []
    if group:
        yield group[rank::world], group[:1]


def reference_metrics(refs: Refs, ctx: PassContext) -> dict:
    """The same eval/* metrics for the reference itself as the policy: no forward needed, its
    log-probs are the shards' (rewards, margins and log-ratios are 0 by definition; the loss is
    each loss's value there). The baseline a policy's figures are read against."""
    ctx = ctx.for_refs(refs)
    sums = torch.zeros(len(ctx.sum_keys), dtype=torch.float64)
    for chunk, _ in _chunks(epoch_pairs(refs, 0, 0, 1), ctx.micro_batch_size, 0, 1):
        ref_chosen, ref_rejected = (torch.tensor([p[key] for p in chunk], dtype=torch.float64)
                                    for key in ("ref_chosen_logps", "ref_rejected_logps"))
        chosen_tokens = float(sum(p["chosen_scored_tokens"] for p in chunk))
        sums += _losses(chunk, ref_chosen, ref_rejected, ctx, chosen_tokens, 0.0, 0)[1]()  # KTO: kl is 0 here
    return metrics_of(sums, ctx, "eval/")


def heldout_metrics(model, refs: Refs, ctx: PassContext, rank: int = 0, world: int = 1,
                    reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> dict:
    """eval/* metrics over every pair of a held-out set, streamed in a fixed order (one micro-batch
    in memory at a time); `reduce` sums the per-worker sums across workers."""
    was_training = model.training
    model.eval()
    # One chunk of micro_batch_size pairs is one forward here (rounds=1, so workers run as many): no token budget.
    ctx = dataclasses.replace(ctx.for_refs(refs), micro_batch_tokens=None)
    sums = torch.zeros(len(ctx.sum_keys), dtype=torch.float64)
    kl = 0.0
    with torch.no_grad():
        if ctx.needs_kl:  # KTO: the KL estimate over the whole held-out set first
            parts = torch.zeros(2, dtype=torch.float64)
            for chunk, ghost in _chunks(epoch_pairs(refs, 0, 0, 1), ctx.micro_batch_size, rank, world):
                parts += kl_sums(model, chunk, ctx, rounds=1, ghost=ghost)
            kl = float(kl_estimate(*reduce(parts)))
        for chunk, ghost in _chunks(epoch_pairs(refs, 0, 0, 1), ctx.micro_batch_size, rank, world):
            check_held()  # an eval (or in-process training) that lost its output's lease stops here
            chosen_tokens = float(sum(p["chosen_scored_tokens"] for p in chunk))
            sums += run_pairs(model, chunk, ctx, max(len(chunk), 1), chosen_tokens, train=False, rounds=1,
                              ghost=ghost, kl=kl)
    if was_training:
        model.train()
    return metrics_of(reduce(sums), ctx, "eval/", kl)
