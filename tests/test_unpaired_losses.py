"""KTO and unpaired APO-zero against hand-computed values, their properties, and trl 1.16.0's own
KTOTrainer._compute_loss on the same tensors (a stub model returns the log-probs; no real model).
"""

from __future__ import annotations

import math
import types
from collections import defaultdict

import pytest
import torch

from stages.core.training.unpaired_losses import (
    KL_LOSSES,
    UNPAIRED_LOSSES,
    UNPAIRED_SUM_KEYS,
    UnpairedBatch,
    UnpairedParams,
    apo_zero_unpaired,
    kl_estimate,
    kl_sum_count,
    kto,
    reduce_unpaired,
    unpaired_metrics,
    unpaired_rewards,
)

E = math.exp


def t(v):
    return torch.tensor(v, dtype=torch.float64)


def batch(pol, ref, pol_kl, ref_kl, desirable):
    return UnpairedBatch(t(pol), t(ref), t(pol_kl), t(ref_kl), torch.tensor(desirable, dtype=torch.bool))


# --- Hand-computed: beta 0.5, lambda_D 2, lambda_U 3 -------------------------------------------
# Example 0 desirable, r = -3 - (-5) = 2; example 1 undesirable, r = -8 - (-6) = -2.
# KL samples: (-4) - (-5) = 1 and (-6) - (-6) = 0, so z_0 = 0.5.
HAND = batch([-3.0, -8.0], [-5.0, -6.0], [-4.0, -6.0], [-5.0, -6.0], [True, False])
HP = UnpairedParams(beta=0.5, desirable_weight=2.0, undesirable_weight=3.0)


def test_kto_hand_computed():
    kl = kl_estimate(*kl_sum_count(HAND))
    assert kl.item() == 0.5
    # desirable: 2 * (1 - sigma(0.5 * (2 - 0.5))) = 2 * (1 - sigma(0.75)); 1 - sigma(x) = e^-x / (1 + e^-x)
    # undesirable: 3 * (1 - sigma(0.5 * (0.5 - (-2)))) = 3 * (1 - sigma(1.25))
    expected = [2 * E(-0.75) / (1 + E(-0.75)), 3 * E(-1.25) / (1 + E(-1.25))]
    assert kto(HAND, HP, kl).tolist() == pytest.approx(expected, abs=1e-12)
    assert reduce_unpaired(kto(HAND, HP, kl)).item() == pytest.approx(sum(expected) / 2, abs=1e-12)


def test_apo_zero_unpaired_hand_computed_ignores_kl():
    # desirable: 2 * (1 - sigma(0.5 * 2)) = 2 e^-1 / (1 + e^-1); undesirable: 3 * sigma(0.5 * -2) = 3 / (1 + e^1)
    expected = [2 * E(-1.0) / (1 + E(-1.0)), 3 / (1 + E(1.0))]
    for kl in (0.0, 0.5, t(7.0)):
        assert apo_zero_unpaired(HAND, HP, kl).tolist() == pytest.approx(expected, abs=1e-12)
    assert apo_zero_unpaired(HAND, HP, 0.0).tolist() == pytest.approx(kto(HAND, HP, 0.0).tolist(), abs=1e-12)


def test_rewards_hand_computed():
    kl = kl_estimate(*kl_sum_count(HAND))
    sums = unpaired_rewards(HAND, HP, kl)
    assert set(UNPAIRED_SUM_KEYS) | {"kl"} == set(sums)
    m = unpaired_metrics(sums)
    assert m["rewards/chosen"] == pytest.approx(0.5 * 2)
    assert m["rewards/rejected"] == pytest.approx(0.5 * -2)
    assert m["rewards/margins"] == pytest.approx(2.0)
    assert (m["logps/chosen"], m["logps/rejected"], m["kl"]) == (-3.0, -8.0, 0.5)
    assert (m["count/desirable"], m["count/undesirable"]) == (1.0, 1.0)


# --- Properties ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(UNPAIRED_LOSSES))
def test_policy_equal_reference_gives_half_the_weight(name):
    logps, kl_logps = [-3.0, -7.0, -2.0, -9.0], [-4.0, -5.0, -6.0, -1.0]
    b = batch(logps, logps, kl_logps, kl_logps, [True, True, True, False])
    p = UnpairedParams(beta=0.1, desirable_weight=2.0, undesirable_weight=3.0)
    kl = kl_estimate(*kl_sum_count(b))
    assert kl.item() == 0.0
    losses = UNPAIRED_LOSSES[name](b, p, kl)
    assert losses.tolist() == pytest.approx([1.0, 1.0, 1.0, 1.5])
    weights = [2.0, 2.0, 2.0, 3.0]
    assert reduce_unpaired(losses).item() == pytest.approx(0.5 * sum(weights) / len(weights))
    m = unpaired_metrics(unpaired_rewards(b, p, kl))
    assert m["rewards/chosen"] == m["rewards/rejected"] == m["rewards/margins"] == m["kl"] == 0.0


def test_kl_estimate_is_clamped_and_detached():
    b = UnpairedBatch(t([-1.0, -2.0]).requires_grad_(), t([-1.5, -2.5]), t([-3.0, -4.0]).requires_grad_(),
                      t([-1.0, -1.0]), torch.tensor([True, False]))
    s, n = kl_sum_count(b)
    assert (s.item(), n.item()) == (-5.0, 2.0)
    assert not s.requires_grad
    kl = kl_estimate(s, n)
    assert kl.item() == 0.0  # mean -2.5 < 0 clamps to 0
    kto(b, UnpairedParams(), kl).sum().backward()
    assert b.policy_kl_logps.grad is None  # the KL term passes no gradient
    assert b.policy_logps.grad is not None and b.policy_logps.grad.abs().sum() > 0
    z0 = t(0.3).requires_grad_()
    kto(b, UnpairedParams(), z0).sum().backward()
    assert z0.grad is None  # kto detaches z_0 itself, too
    assert kl_estimate(0.0, 0).item() == 0.0  # an empty batch: count floors at 1
    assert kl_estimate(t(3.0), t(2.0)).item() == 1.5


def test_kl_sums_over_parts_equal_the_whole():
    g = torch.Generator().manual_seed(1)
    b = UnpairedBatch(*(torch.randn(8, generator=g, dtype=torch.float64) for _ in range(4)),
                      torch.rand(8, generator=g) < 0.5)
    b = UnpairedBatch(b.policy_logps, b.ref_logps, b.ref_kl_logps + 1.0, b.ref_kl_logps, b.desirable)
    halves = [UnpairedBatch(*(getattr(b, f)[sl] for f in ("policy_logps", "ref_logps", "policy_kl_logps",
                                                          "ref_kl_logps", "desirable")))
              for sl in (slice(0, 4), slice(4, 8))]
    (s1, n1), (s2, n2) = (kl_sum_count(h) for h in halves)
    whole = kl_estimate(*kl_sum_count(b))
    assert kl_estimate(s1 + s2, n1 + n2).item() == pytest.approx(whole.item(), abs=1e-12)
    assert whole.item() == pytest.approx(1.0)
    # TRL's gathered form, the mean of per-process means, agrees for equal halves.
    assert whole.item() == pytest.approx(((s1 / n1 + s2 / n2) / 2).item(), abs=1e-12)
    # Rewards sums add up the same way.
    p = UnpairedParams()
    parts = [unpaired_rewards(h, p, whole) for h in halves]
    total = {k: parts[0][k] + parts[1][k] for k in UNPAIRED_SUM_KEYS} | {"kl": whole}
    assert unpaired_metrics(total) == pytest.approx(unpaired_metrics(unpaired_rewards(b, p, whole)))
    # The micro-batch shares of the loss add up to the batch mean.
    shares = sum(reduce_unpaired(kto(h, p, whole), n_total=8) for h in halves)
    assert shares.item() == pytest.approx(reduce_unpaired(kto(b, p, whole)).item(), abs=1e-12)


def test_one_class_batches_report_no_nan():
    b = batch([-1.0, -2.0], [-1.5, -2.5], [-3.0, -4.0], [-3.5, -4.0], [True, True])
    m = unpaired_metrics(unpaired_rewards(b, UnpairedParams(), 0.0))
    assert "rewards/rejected" not in m and "rewards/margins" not in m and "logps/rejected" not in m
    assert m["count/undesirable"] == 0.0 and not any(math.isnan(v) for v in m.values())
    sums = unpaired_rewards(b, UnpairedParams(), 0.0)
    assert sums["rewards/rejected"].item() == 0.0 and sums["logps/rejected"].item() == 0.0


def test_the_names_are_trls():
    pytest.importorskip("trl")
    from trl import KTOConfig

    assert set(UNPAIRED_LOSSES) == {"kto", "apo_zero_unpaired"}
    choices = [f for f in KTOConfig.__dataclass_fields__.values() if f.name == "loss_type"][0].metadata["choices"]
    assert set(choices) == set(UNPAIRED_LOSSES)
    assert KL_LOSSES == {"kto"}


# --- TRL parity: trl 1.16.0's KTOTrainer._compute_loss on the same tensors ----------------------

class _StubLM:
    """Stands in for the policy: row i of `input_ids` is [i, 0] for the example's own completion and
    [i, 1] for its KL completion; the one scored token's log-prob is that example's summed log-prob."""

    training = True

    def __init__(self, logps, kl_logps):
        self.table = torch.stack([logps, kl_logps])  # (2, B)

    def __call__(self, input_ids, attention_mask=None, labels=None, use_cache=None, fused_lm_head=None, **kwargs):
        log_probs = self.table[input_ids[:, 1], input_ids[:, 0]][:, None]  # (B, 1): seq_len 1
        zeros = torch.zeros_like(log_probs).detach()
        return types.SimpleNamespace(log_probs=log_probs, entropy=zeros, mean_logits=zeros)


def trl_loss(b: UnpairedBatch, p: UnpairedParams, loss_type: str):
    """(loss, metrics) from TRL's own _compute_loss, with precomputed reference log-probs, on one process."""
    from trl import KTOTrainer

    n = b.policy_logps.numel()
    idx = torch.arange(n)
    model = _StubLM(b.policy_logps, b.policy_kl_logps)
    ones = torch.ones(n, 2, dtype=torch.long)
    completion_mask = torch.tensor([[0, 1]] * n)
    inputs = {"input_ids": torch.stack([idx, torch.zeros(n, dtype=torch.long)], 1), "attention_mask": ones,
              "completion_mask": completion_mask, "label": b.desirable.clone(), "ref_logps": b.ref_logps}
    if loss_type in KL_LOSSES:
        inputs |= {"KL_input_ids": torch.stack([idx, torch.ones(n, dtype=torch.long)], 1),
                   "KL_attention_mask": ones, "KL_completion_mask": completion_mask, "ref_KL_logps": b.ref_kl_logps}
    trainer = types.SimpleNamespace(
        beta=p.beta, loss_type=loss_type, desirable_weight=p.desirable_weight,
        undesirable_weight=p.undesirable_weight, calculate_KL=loss_type in KL_LOSSES, precompute_ref_logps=True,
        aux_loss_enabled=False, model=model, _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0, _tp_size=1,
        accelerator=types.SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x))
    trainer._compute_kl_logps = types.MethodType(KTOTrainer._compute_kl_logps, trainer)
    loss = KTOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}


def random_batch(n: int, seed: int, desirable=None, kl_shift: float = 3.0) -> UnpairedBatch:
    g = torch.Generator().manual_seed(seed)
    r = lambda: -50 + 10 * torch.randn(n, generator=g, dtype=torch.float64)  # noqa: E731
    ref, ref_kl = r(), r()
    pol = (ref + 8 * torch.randn(n, generator=g, dtype=torch.float64)).requires_grad_()
    pol_kl = ref_kl + kl_shift + torch.randn(n, generator=g, dtype=torch.float64)
    if desirable is None:
        desirable = torch.rand(n, generator=g) < 0.6
    return UnpairedBatch(pol, ref, pol_kl, ref_kl, torch.as_tensor(desirable, dtype=torch.bool))


LABELS = {"mixed": None, "desirable_only": [True] * 6, "undesirable_only": [False] * 6,
          "one_each": [False, True, False, False, False, False]}
PARAMS = [UnpairedParams(), UnpairedParams(beta=0.05, desirable_weight=1.33, undesirable_weight=0.7)]


@pytest.mark.parametrize("labels", sorted(LABELS))
@pytest.mark.parametrize("p", PARAMS, ids=["default", "weighted"])
@pytest.mark.parametrize("kl_shift", [3.0, -3.0], ids=["kl_positive", "kl_clamped"])
@pytest.mark.parametrize("name", sorted(UNPAIRED_LOSSES))
def test_matches_trl(name, p, labels, kl_shift):
    pytest.importorskip("trl")
    b = random_batch(6, seed=len(labels) + int(kl_shift), desirable=LABELS[labels], kl_shift=kl_shift)
    theirs, metrics = trl_loss(b, p, name)
    (g_theirs,) = torch.autograd.grad(theirs, b.policy_logps)

    kl = kl_estimate(*kl_sum_count(b)) if name in KL_LOSSES else 0.0
    ours = reduce_unpaired(UNPAIRED_LOSSES[name](b, p, kl))
    (g_ours,) = torch.autograd.grad(ours, b.policy_logps)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-12, abs=1e-14)
    assert torch.allclose(g_ours, g_theirs, rtol=1e-10, atol=1e-14)
    if name in KL_LOSSES and kl_shift < 0:
        assert metrics["kl"] == 0.0  # the clamp is exercised: the raw mean is negative
    if name in KL_LOSSES and kl_shift > 0:
        assert metrics["kl"] > 0

    m = unpaired_metrics(unpaired_rewards(b, p, kl))
    shared = {k for k in metrics if k.startswith(("rewards/", "logps/")) or k == "kl"}
    assert shared == {k for k in m if not k.startswith("count/")}
    assert {k: m[k] for k in shared} == pytest.approx({k: metrics[k] for k in shared}, rel=1e-12, abs=1e-12)
