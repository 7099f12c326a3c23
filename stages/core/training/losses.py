"""The DPO loss family: one small pure function per loss, chosen by name from `LOSSES`.

Every function takes a `Batch` of summed log-probs (B,) and the `LossParams`, and returns the
per-pair loss (B,). Formulas follow trl 1.16.0's DPOTrainer where TRL has the loss (tests compare
with TRL's own code on the same batch); SimPO and ORPO, which TRL keeps elsewhere, follow their
papers. Names follow the paper: policy_chosen_logps, ref_rejected_logps, beta.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Batch:
    policy_chosen_logps: torch.Tensor    # (B,) summed log pi_theta(y_w|x)
    policy_rejected_logps: torch.Tensor  # (B,) summed log pi_theta(y_l|x)
    ref_chosen_logps: torch.Tensor       # (B,) summed log pi_ref(y_w|x), from the shards
    ref_rejected_logps: torch.Tensor     # (B,)
    chosen_tokens: torch.Tensor          # (B,) completion tokens each chosen sum covers
    rejected_tokens: torch.Tensor        # (B,)
    total_chosen_tokens: float = 0.0     # chosen tokens in the whole optimizer batch (token-mean losses)

    @property
    def chosen_logratios(self) -> torch.Tensor:
        return self.policy_chosen_logps - self.ref_chosen_logps

    @property
    def rejected_logratios(self) -> torch.Tensor:
        return self.policy_rejected_logps - self.ref_rejected_logps

    @property
    def delta(self) -> torch.Tensor:
        """(log pi/pi_ref)(y_w) - (log pi/pi_ref)(y_l): the DPO logit before beta."""
        return self.chosen_logratios - self.rejected_logratios


@dataclass(frozen=True)
class LossParams:
    beta: float = 0.1             # KL strength (IPO's tau; ORPO's lambda; SimPO's beta)
    label_smoothing: float = 0.0  # assumed label-flip rate (robust, exo_pair, aot)
    discopop_tau: float = 0.05    # DiscoPOP mixing temperature
    simpo_gamma: float = 0.5      # SimPO target reward margin gamma (the paper's gamma, not gamma / beta)


def sigmoid(b: Batch, p: LossParams) -> torch.Tensor:
    """DPO (Rafailov et al. 2023, arXiv:2305.18290): -log sigma(beta * delta)."""
    return -F.logsigmoid(p.beta * b.delta)


def robust(b: Batch, p: LossParams) -> torch.Tensor:
    """Robust DPO / cDPO (Chowdhury et al. 2024, arXiv:2403.00409): unbiased under label flips at rate eps."""
    eps = p.label_smoothing
    clean = -(1 - eps) * F.logsigmoid(p.beta * b.delta)
    flipped = -eps * F.logsigmoid(-p.beta * b.delta)
    return (clean - flipped) / (1 - 2 * eps)


def hinge(b: Batch, p: LossParams) -> torch.Tensor:
    """SLiC hinge (Zhao et al. 2023, arXiv:2305.10425): relu(1 - beta * delta)."""
    return torch.relu(1 - p.beta * b.delta)


def ipo(b: Batch, p: LossParams) -> torch.Tensor:
    """IPO (Azar et al. 2023, arXiv:2310.12036, Eq. 17) on per-token averaged log-ratios, as TRL."""
    delta = b.chosen_logratios / b.chosen_tokens.clamp(min=1) - b.rejected_logratios / b.rejected_tokens.clamp(min=1)
    return (delta - 1 / (2 * p.beta)) ** 2


def exo_pair(b: Batch, p: LossParams) -> torch.Tensor:
    """EXO (Ji et al. 2024, arXiv:2402.00856, Eq. 16): KL(p_theta || p_rh) with p_rh = (1 - eps, eps).

    Needs label_smoothing > 0 (TRL defaults it to 1e-3 for this loss).
    """
    eps = torch.tensor(p.label_smoothing, dtype=b.delta.dtype, device=b.delta.device)
    logits = p.beta * b.delta
    return (torch.sigmoid(logits) * (F.logsigmoid(logits) - torch.log1p(-eps))
            + torch.sigmoid(-logits) * (F.logsigmoid(-logits) - torch.log(eps)))


def nca_pair(b: Batch, p: LossParams) -> torch.Tensor:
    """NCA (Chen et al. 2024, arXiv:2402.05369): absolute likelihoods, not only their gap."""
    chosen, rejected = p.beta * b.chosen_logratios, p.beta * b.rejected_logratios
    return -F.logsigmoid(chosen) - 0.5 * F.logsigmoid(-chosen) - 0.5 * F.logsigmoid(-rejected)


def bco_pair(b: Batch, p: LossParams) -> torch.Tensor:
    """BCO, paired form (Jung et al. 2024, arXiv:2404.04656), without the running reward shift, as TRL."""
    return -F.logsigmoid(p.beta * b.chosen_logratios) - F.logsigmoid(-p.beta * b.rejected_logratios)


def sppo_hard(b: Batch, p: LossParams) -> torch.Tensor:
    """SPPO with hard win probabilities (Wu et al. 2024, arXiv:2405.00675, Eq. 4.7, P = 1 / 0)."""
    return (b.chosen_logratios - 0.5 / p.beta) ** 2 + (b.rejected_logratios + 0.5 / p.beta) ** 2


def _smoothed(logits: torch.Tensor, eps: float) -> torch.Tensor:
    return -F.logsigmoid(logits) * (1 - eps) - F.logsigmoid(-logits) * eps


def aot(b: Batch, p: LossParams) -> torch.Tensor:
    """AOT paired (Melnyk et al. 2024, arXiv:2406.05882): sorted policy vs sorted reference log-ratios.

    Sorting couples the pairs of one forward batch (as TRL's per-device batch).
    """
    logratios, _ = torch.sort(b.policy_chosen_logps - b.policy_rejected_logps, dim=0)
    ref_logratios, _ = torch.sort(b.ref_chosen_logps - b.ref_rejected_logps, dim=0)
    return _smoothed(p.beta * (logratios - ref_logratios), p.label_smoothing)


def aot_unpaired(b: Batch, p: LossParams) -> torch.Tensor:
    """AOT unpaired (Melnyk et al. 2024, arXiv:2406.05882): sorted chosen vs sorted rejected log-ratios."""
    chosen, _ = torch.sort(b.chosen_logratios, dim=0)
    rejected, _ = torch.sort(b.rejected_logratios, dim=0)
    return _smoothed(p.beta * (chosen - rejected), p.label_smoothing)


def apo_zero(b: Batch, p: LossParams) -> torch.Tensor:
    """APO-zero (D'Oosterlinck et al. 2024, arXiv:2408.06266, Eq. 7): raise chosen, lower rejected."""
    return (1 - torch.sigmoid(p.beta * b.chosen_logratios)) + torch.sigmoid(p.beta * b.rejected_logratios)


def apo_down(b: Batch, p: LossParams) -> torch.Tensor:
    """APO-down (arXiv:2408.06266, Eq. 8): lower both, rejected more; for chosen worse than the model's own."""
    return torch.sigmoid(p.beta * b.chosen_logratios) + (1 - torch.sigmoid(p.beta * b.delta))


def discopop(b: Batch, p: LossParams) -> torch.Tensor:
    """DiscoPOP / log-ratio modulated loss (Chris Lu et al. 2024, arXiv:2406.08414, Eq. 5)."""
    logits = p.beta * b.delta
    mix = torch.sigmoid(logits / p.discopop_tau)
    return -F.logsigmoid(logits) * (1 - mix) + torch.exp(-logits) * mix


def sigmoid_norm(b: Batch, p: LossParams) -> torch.Tensor:
    """DPO on per-token averaged log-ratios (length-normalised DPO, as TRL's sigmoid_norm)."""
    delta = b.chosen_logratios / b.chosen_tokens.clamp(min=1) - b.rejected_logratios / b.rejected_tokens.clamp(min=1)
    return -F.logsigmoid(p.beta * delta)


def sft(b: Batch, p: LossParams) -> torch.Tensor:
    """NLL of the chosen completions, averaged over all chosen tokens of the optimizer batch.

    Returned per pair so that the batch mean is the token mean: each pair contributes
    -log pi(y_w|x) * B / total_chosen_tokens.
    """
    total = b.total_chosen_tokens or float(b.chosen_tokens.sum())
    return -b.policy_chosen_logps * (b.policy_chosen_logps.numel() / max(total, 1.0))


def simpo(b: Batch, p: LossParams) -> torch.Tensor:
    """SimPO (Meng et al. 2024, arXiv:2405.14734, Eq. 6), reference-free, as TRL's CPOTrainer:
    -log sigma(beta * (avg log pi(y_w) - avg log pi(y_l)) - gamma), gamma = simpo_gamma, label-smoothed."""
    avg_w = b.policy_chosen_logps / b.chosen_tokens.clamp(min=1)
    avg_l = b.policy_rejected_logps / b.rejected_tokens.clamp(min=1)
    return _smoothed(p.beta * (avg_w - avg_l) - p.simpo_gamma, p.label_smoothing)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable near 0."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo(b: Batch, p: LossParams) -> torch.Tensor:
    """ORPO (Hong et al. 2024, arXiv:2403.07691, Eq. 6-7), reference-free:
    NLL(y_w) - lambda * log sigma(log odds ratio).

    beta is lambda; log odds(y) = avg log p(y) - log(1 - exp(avg log p(y))): the odds-ratio term is
    TRL's ORPOTrainer's (a test compares them). The NLL term is the paper's, over the chosen
    completion's tokens; TRL's also counts the prompt's tokens, so the totals differ by design.
    """
    avg_w = b.policy_chosen_logps / b.chosen_tokens.clamp(min=1)
    avg_l = b.policy_rejected_logps / b.rejected_tokens.clamp(min=1)
    log_odds = (avg_w - avg_l) - (_log1mexp(avg_w) - _log1mexp(avg_l))
    return sft(b, p) - p.beta * F.logsigmoid(log_odds)


LOSSES: dict[str, Callable[[Batch, LossParams], torch.Tensor]] = {
    "sigmoid": sigmoid, "robust": robust, "hinge": hinge, "ipo": ipo, "exo_pair": exo_pair, "nca_pair": nca_pair,
    "bco_pair": bco_pair, "sppo_hard": sppo_hard, "aot": aot, "aot_unpaired": aot_unpaired, "apo_zero": apo_zero,
    "apo_down": apo_down, "discopop": discopop, "sigmoid_norm": sigmoid_norm, "sft": sft, "simpo": simpo,
    "orpo": orpo,
}  # the names are `stages.core.config.LOSS_NAMES`, which the config checks `--loss-type` against


def combined_loss(b: Batch, p: LossParams, terms: list[tuple[str, float]]) -> torch.Tensor:
    """Weighted sum of the chosen losses, each a per-pair tensor (B,)."""
    return sum(weight * LOSSES[name](b, p) for name, weight in terms)


# |delta| below this many nats is a tie for rewards/accuracies. The policy's log-probs come from
# other batch shapes than the shards' (~1e-6 nats apart in float32), and TRL's strict
# chosen > rejected would count that noise as wins when the policy equals the reference.
TIE_NATS = 1e-4


def rewards(b: Batch, p: LossParams) -> dict[str, torch.Tensor]:
    """Implicit rewards beta * log(pi/pi_ref), per pair, detached; the metrics people watch."""
    chosen = p.beta * b.chosen_logratios.detach()
    rejected = p.beta * b.rejected_logratios.detach()
    wins = b.delta.detach() > TIE_NATS
    return {"rewards/chosen": chosen, "rewards/rejected": rejected,
            "rewards/accuracies": wins.to(chosen.dtype), "rewards/margins": chosen - rejected,
            "logps/chosen": b.policy_chosen_logps.detach(), "logps/rejected": b.policy_rejected_logps.detach()}


LN2 = math.log(2.0)
