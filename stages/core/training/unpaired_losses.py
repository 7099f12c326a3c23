"""Losses for unpaired feedback: each example is one completion labelled desirable or undesirable.

KTO (Ethayarajh et al. 2024, arXiv:2402.01306, Eq. 7) and the unpaired APO-zero (D'Oosterlinck et al.
2024, arXiv:2408.06266), as trl 1.16.0's KTOTrainer computes them (`KTOTrainer._compute_loss`; tests
run that code on the same tensors). One small pure function per loss, chosen by name from
`UNPAIRED_LOSSES`; each takes an `UnpairedBatch` of summed log-probs (B,), the `UnpairedParams` and
the KL estimate z_0, and returns the per-example loss (B,), already multiplied by its class weight.

The reduction TRL uses (see `reduce_unpaired`): the weighted per-example losses of a forward batch,
desirable then undesirable, concatenated and averaged with a plain mean over examples; the weights
multiply, they do not renormalise. The Trainer divides each micro-batch's mean by the gradient
accumulation steps and DDP averages over workers, so with equal micro-batches the optimizer batch's
loss is the plain mean over all its examples: sum(losses) / examples in the optimizer batch.

The KL reference point z_0 (`kl_sum_count`, `kl_estimate`): TRL pairs each prompt x_i with another
example's completion y' (completions rotated by one within each per-device batch of the sequentially
sampled data: (x_1, y_n), (x_2, y_1), ..., (x_n, y_{n-1})), takes the mean of
log pi(y'|x) - log pi_ref(y'|x) over the forward batch, detached (the policy's y' log-probs are computed
under no_grad), gathers that mean over processes, averages it and clamps it at 0. APO-zero needs no KL
(TRL skips the y' forward and uses 0); `KL_LOSSES` names the losses that do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class UnpairedBatch:
    policy_logps: torch.Tensor     # (B,) summed log pi_theta(y|x) of each example's own completion
    ref_logps: torch.Tensor        # (B,) summed log pi_ref(y|x)
    policy_kl_logps: torch.Tensor  # (B,) summed log pi_theta(y'|x), y' another example's completion
    ref_kl_logps: torch.Tensor     # (B,) summed log pi_ref(y'|x)
    desirable: torch.Tensor        # (B,) bool: True for a desirable completion, False for an undesirable one

    @property
    def logratios(self) -> torch.Tensor:
        """log pi(y|x) / pi_ref(y|x), whose beta multiple is the implied reward r_theta(x, y)."""
        return self.policy_logps - self.ref_logps

    @property
    def kl_logratios(self) -> torch.Tensor:
        """log pi(y'|x) / pi_ref(y'|x) on the mismatched pairs: the samples of the KL estimate."""
        return self.policy_kl_logps - self.ref_kl_logps


@dataclass(frozen=True)
class UnpairedParams:
    beta: float = 0.1                # KL strength
    desirable_weight: float = 1.0    # lambda_D, multiplies each desirable example's loss
    undesirable_weight: float = 1.0  # lambda_U, multiplies each undesirable example's loss


def kl_sum_count(b: UnpairedBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum, count) of log pi(y'|x) - log pi_ref(y'|x) over this (micro-)batch, detached.

    Add sums and counts over micro-batches and workers (one all-reduce), then `kl_estimate`.
    TRL's z_0 is the mean over one forward batch, gathered across processes as the mean of the
    per-process means: the same as sum / count over those forward batches when they are the same
    size. Adding over a whole optimizer batch (gradient accumulation > 1) is a steadier estimate
    than TRL's, which takes a fresh z_0 for each micro-batch.
    """
    d = b.kl_logratios.detach()
    return d.sum(), torch.tensor(float(d.numel()), dtype=d.dtype, device=d.device)


def kl_estimate(kl_sum: torch.Tensor | float, count: torch.Tensor | float) -> torch.Tensor:
    """z_0 = max(sum / max(count, 1), 0), detached: TRL's `.mean().detach()`, then `.clamp(min=0)`."""
    kl_sum = torch.as_tensor(kl_sum).detach()
    count = torch.as_tensor(count, dtype=kl_sum.dtype, device=kl_sum.device)
    return (kl_sum / count.clamp(min=1)).clamp(min=0)


def kto(b: UnpairedBatch, p: UnpairedParams, kl: torch.Tensor | float) -> torch.Tensor:
    """KTO (arXiv:2402.01306, Eq. 7), as TRL: each example's lambda_y - v(x, y), that is
    desirable:   lambda_D * (1 - sigma(beta * (r - z_0)))
    undesirable: lambda_U * (1 - sigma(beta * (z_0 - r)))
    with r = log pi(y|x) / pi_ref(y|x) and z_0 the detached KL estimate (`kl_estimate`)."""
    r = b.logratios
    kl = torch.as_tensor(kl, dtype=r.dtype, device=r.device).detach()  # z_0 passes no gradient, as TRL
    desirable = p.desirable_weight * (1 - torch.sigmoid(p.beta * (r - kl)))
    undesirable = p.undesirable_weight * (1 - torch.sigmoid(p.beta * (kl - r)))
    return torch.where(b.desirable, desirable, undesirable)


def apo_zero_unpaired(b: UnpairedBatch, p: UnpairedParams, kl: torch.Tensor | float = 0.0) -> torch.Tensor:
    """APO-zero, unpaired (arXiv:2408.06266, Eq. 7 split by label), as TRL's `apo_zero_unpaired`:
    desirable:   lambda_D * (1 - sigma(beta * r))   (raise the likelihood of desirable completions)
    undesirable: lambda_U * sigma(beta * r)         (lower that of undesirable ones)
    No KL term: `kl` is ignored (TRL computes none). It equals `kto` with z_0 = 0."""
    r = b.logratios
    desirable = p.desirable_weight * (1 - torch.sigmoid(p.beta * r))
    undesirable = p.undesirable_weight * torch.sigmoid(p.beta * r)
    return torch.where(b.desirable, desirable, undesirable)


UNPAIRED_LOSSES: dict[str, Callable[[UnpairedBatch, UnpairedParams, torch.Tensor | float], torch.Tensor]] = {
    "kto": kto, "apo_zero_unpaired": apo_zero_unpaired,
}  # the names of trl 1.16.0's KTOConfig.loss_type
KL_LOSSES = frozenset({"kto"})  # the losses that use z_0: only these need the mismatched y' forward


def reduce_unpaired(losses: torch.Tensor, n_total: float | None = None) -> torch.Tensor:
    """The batch loss from per-example losses, as TRL: their plain mean (weights already applied).

    With `n_total` (the examples in the whole optimizer batch, over all workers) it is this
    micro-batch's share, sum / n_total: adding the shares over micro-batches and workers gives the
    mean over the optimizer batch, which is TRL's loss when its micro-batches are the same size.
    """
    if n_total is None:
        return losses.mean()
    return losses.sum() / max(float(n_total), 1.0)


UNPAIRED_SUM_KEYS = ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected",
                     "count/desirable", "count/undesirable")


def unpaired_rewards(b: UnpairedBatch, p: UnpairedParams, kl: torch.Tensor | float) -> dict[str, torch.Tensor]:
    """The inputs of TRL's KTO metrics, detached, as sums and counts so that they add up.

    `rewards/chosen` and `rewards/rejected` are the sums of beta * log(pi/pi_ref) over the desirable
    and undesirable examples, `logps/chosen` and `logps/rejected` the sums of their policy log-probs,
    `count/desirable` and `count/undesirable` how many there are (a class absent from the batch adds
    0 and 0, never NaN). Add the `UNPAIRED_SUM_KEYS` entries over micro-batches and workers, then
    `unpaired_metrics`. `kl` is z_0 as given (0-d): the same on every worker, not to be added.
    """
    r = p.beta * b.logratios.detach()
    logps = b.policy_logps.detach()
    d = b.desirable
    zero = torch.zeros((), dtype=r.dtype, device=r.device)
    return {"rewards/chosen": torch.where(d, r, zero).sum(), "rewards/rejected": torch.where(d, zero, r).sum(),
            "logps/chosen": torch.where(d, logps, zero).sum(), "logps/rejected": torch.where(d, zero, logps).sum(),
            "count/desirable": d.sum().to(r.dtype), "count/undesirable": (~d).sum().to(r.dtype),
            "kl": torch.as_tensor(kl, dtype=r.dtype, device=r.device).detach().reshape(())}


def unpaired_metrics(totals: dict) -> dict[str, float]:
    """TRL's logged KTO metrics from summed `unpaired_rewards`: means over the examples of each class
    (TRL's gathered sum / gathered count), omitted where the class is absent as TRL omits them;
    `rewards/margins` = chosen mean - rejected mean where both are present; `kl` as given."""
    t = {k: float(v) for k, v in totals.items()}
    out = {}
    for cls, count in (("chosen", t["count/desirable"]), ("rejected", t["count/undesirable"])):
        if count > 0:
            out[f"rewards/{cls}"] = t[f"rewards/{cls}"] / count
            out[f"logps/{cls}"] = t[f"logps/{cls}"] / count
    if "rewards/chosen" in out and "rewards/rejected" in out:
        out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
    out["kl"] = t["kl"]
    out["count/desirable"], out["count/undesirable"] = t["count/desirable"], t["count/undesirable"]
    return out
