"""Every loss against hand-computed values, its properties, and TRL's own loss code on the same batch.

Inputs are picked so that beta * delta = [0, 1, 2] (beta = 0.1, delta = [0, 10, 20]), so the
expected numbers can be written with math.log / math.exp, one line per loss.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from stages.core.config.engine import ConfigError
from stages.core.config.options import LOSS_NAMES, parse_loss_types
from stages.core.training.losses import LN2, LOSSES, TIE_NATS, Batch, LossParams, combined_loss, rewards

E = math.exp
ls = lambda x: -math.log1p(E(-x))  # noqa: E731  log sigmoid
sg = lambda x: 1 / (1 + E(-x))  # noqa: E731  sigmoid


def batch(pc=(0.0, 5.0, 10.0), pr=(0.0, -5.0, -10.0), rc=(0.0, 0.0, 0.0), rr=(0.0, 0.0, 0.0), nc=(1, 1, 1),
          nr=(1, 1, 1)):
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    return Batch(t(pc), t(pr), t(rc), t(rr), t(nc), t(nr))


P = LossParams(beta=0.1, label_smoothing=0.1)
X = [0.0, 1.0, 2.0]          # beta * delta
C = [0.0, 0.5, 1.0]          # beta * chosen log-ratio
R = [0.0, -0.5, -1.0]        # beta * rejected log-ratio


def expected(name: str) -> list[float]:
    eps, beta = 0.1, 0.1
    return {
        "sigmoid": [-ls(x) for x in X],
        "robust": [(-(1 - eps) * ls(x) + eps * ls(-x)) / (1 - 2 * eps) for x in X],
        "hinge": [max(0.0, 1 - x) for x in X],
        "ipo": [(x / beta - 1 / (2 * beta)) ** 2 for x in X],  # one token each: averages are sums
        "exo_pair": [sg(x) * (ls(x) - math.log(1 - eps)) + sg(-x) * (ls(-x) - math.log(eps)) for x in X],
        "nca_pair": [-ls(c) - 0.5 * ls(-c) - 0.5 * ls(-r) for c, r in zip(C, R)],
        "bco_pair": [-ls(c) - ls(-r) for c, r in zip(C, R)],
        "sppo_hard": [(c / beta - 5) ** 2 + (r / beta + 5) ** 2 for c, r in zip(C, R)],
        "aot": [-(1 - eps) * ls(x) - eps * ls(-x) for x in X],  # already sorted, reference all zero
        "aot_unpaired": [-(1 - eps) * ls(c - r) - eps * ls(r - c) for c, r in zip(C, sorted(R))],
        "apo_zero": [(1 - sg(c)) + sg(r) for c, r in zip(C, R)],
        "apo_down": [sg(c) + (1 - sg(x)) for c, x in zip(C, X)],
        "discopop": [-ls(x) * (1 - sg(x / 0.05)) + E(-x) * sg(x / 0.05) for x in X],
        "sigmoid_norm": [-ls(x) for x in X],
        "sft": [0.0, -5.0, -10.0],  # -log pi(y_w), one token each
        "simpo": [-(1 - eps) * ls(x - 0.5) - eps * ls(0.5 - x) for x in X],
        "orpo": [-pc - beta * ls((pc - pr) - (math.log(-math.expm1(pc)) - math.log(-math.expm1(pr))))
                 for pc, pr in zip([-0.5, -0.2, -0.1], [-0.5, -1.0, -2.0])],
    }[name]


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_hand_computed(name):
    b = batch(pc=(-0.5, -0.2, -0.1), pr=(-0.5, -1.0, -2.0)) if name == "orpo" else batch()
    got = LOSSES[name](b, P).tolist()
    assert got == pytest.approx(expected(name), abs=1e-9), name


def test_length_normalised_losses_divide_by_tokens():
    b = batch(pc=(0.0, 10.0, 20.0), pr=(0.0, -10.0, -20.0), nc=(2, 2, 2), nr=(2, 2, 2))
    assert LOSSES["sigmoid_norm"](b, P).tolist() == pytest.approx(expected("sigmoid_norm"), abs=1e-12)
    assert LOSSES["ipo"](b, P).tolist() == pytest.approx(expected("ipo"), abs=1e-9)


def test_policy_equal_reference_gives_ln2_and_zero_rewards():
    b = batch(pc=(-3.0, -7.0), pr=(-4.0, -9.0), rc=(-3.0, -7.0), rr=(-4.0, -9.0), nc=(1, 1), nr=(1, 1))
    assert LOSSES["sigmoid"](b, P).tolist() == pytest.approx([LN2, LN2])
    r = rewards(b, P)
    assert r["rewards/chosen"].abs().max() == 0 and r["rewards/margins"].abs().max() == 0
    assert r["rewards/accuracies"].sum() == 0  # strict chosen > rejected, as TRL


@pytest.mark.parametrize("name", sorted(set(LOSSES) - {"sft", "apo_down", "sppo_hard", "aot_unpaired", "aot"}))
def test_preferring_chosen_lowers_the_loss(name):
    # beta * delta = -2 vs +2 (DiscoPOP is not monotonic near 0, by design)
    worse = batch(pc=(-10.0,), pr=(10.0,), rc=(0.0,), rr=(0.0,), nc=(1,), nr=(1,))
    better = batch(pc=(10.0,), pr=(-10.0,), rc=(0.0,), rr=(0.0,), nc=(1,), nr=(1,))
    if name == "orpo":
        worse = batch(pc=(-2.0,), pr=(-0.5,), nc=(1,), nr=(1,))
        better = batch(pc=(-0.5,), pr=(-2.0,), nc=(1,), nr=(1,))
    assert LOSSES[name](better, P).item() < LOSSES[name](worse, P).item()


def test_weighted_mix_and_parsing():
    terms = parse_loss_types("sigmoid,sft", "1,0.2")
    assert terms == [("sigmoid", 1.0), ("sft", 0.2)]
    b = batch()
    mix = combined_loss(b, P, terms)
    assert torch.allclose(mix, LOSSES["sigmoid"](b, P) + 0.2 * LOSSES["sft"](b, P))
    with pytest.raises(ConfigError, match="loss_type.*bogus"):
        parse_loss_types("sigmoid,bogus", None)
    with pytest.raises(ConfigError, match="loss_weights"):
        parse_loss_types("sigmoid,sft", "1")


def test_the_config_offers_exactly_the_implemented_losses():
    assert tuple(LOSSES) == LOSS_NAMES


def test_accuracy_tie_boundary_is_exact():
    """delta exactly at TIE_NATS is a tie (not a win); just above it is a win; below zero a loss."""
    pc = (TIE_NATS, TIE_NATS + 1e-9, TIE_NATS / 2, -TIE_NATS)
    b = batch(pc=pc, pr=(0.0,) * 4, rc=(0.0,) * 4, rr=(0.0,) * 4, nc=(1,) * 4, nr=(1,) * 4)
    assert rewards(b, P)["rewards/accuracies"].tolist() == [0.0, 1.0, 0.0, 0.0]


def test_sft_is_token_mean_over_the_batch():
    b = Batch(*(torch.tensor(v, dtype=torch.float64) for v in ([-6.0, -2.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0],
                                                               [3.0, 1.0], [1.0, 1.0])))
    assert LOSSES["sft"](b, P).mean().item() == pytest.approx(8.0 / 4.0)


# --- TRL parity: TRL's own _compute_loss on the same batch --------------------------------------

TRL_SHARED = ["sigmoid", "robust", "hinge", "ipo", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sigmoid_norm", "sft"]


@pytest.fixture(scope="module")
def trl_setup(tokenizer):
    pytest.importorskip("trl")
    from conftest import HH_SAMPLE, make_tiny_model, read_jsonl_gz
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    model = make_tiny_model(tokenizer, seed=4)
    rows = [r for r in read_jsonl_gz(HH_SAMPLE, 20) if r["chosen"] != r["rejected"]][:6]
    args = DPOConfig(output_dir="/tmp/trl-loss", report_to=[], max_length=128, use_cpu=True,
                     precompute_ref_log_probs=False)
    trainer = DPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tokenizer)
    collator = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id, max_length=128)
    examples = [{k: trainer.train_dataset[i][k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
                for i in range(len(trainer.train_dataset))]
    g = torch.Generator().manual_seed(0)
    for ex in examples:  # references that differ from the policy, so losses are not at their ln 2 point
        ex["ref_chosen_logps"] = float(-900 + 50 * torch.randn(1, generator=g))
        ex["ref_rejected_logps"] = float(-900 + 50 * torch.randn(1, generator=g))
    inputs = collator(examples)
    trainer.precompute_ref_logps = True
    from stages.core.scoring.logprobs import sequence_logps

    with torch.no_grad():  # ours, from the same padded batch: chosen rows first, then rejected, as TRL lays them out
        logps = sequence_logps(model, inputs["input_ids"], inputs["attention_mask"], inputs["completion_mask"])
    return trainer, model, inputs, logps


@pytest.mark.parametrize("name", TRL_SHARED)
def test_matches_trl_loss(trl_setup, name):
    trainer, model, inputs, logps = trl_setup
    beta, eps = 0.01, 0.1 if name in ("robust", "exo_pair", "aot", "aot_unpaired") else 0.0
    trainer.loss_types, trainer.loss_weights, trainer.beta, trainer.label_smoothing = [name], [1.0], beta, eps
    with torch.no_grad():
        trl_loss = trainer._compute_loss(model, inputs, return_outputs=False).item()
    n = inputs["input_ids"].size(0) // 2
    tokens = inputs["completion_mask"].sum(1).double()
    b = Batch(logps[:n], logps[n:], inputs["ref_chosen_logps"].double(), inputs["ref_rejected_logps"].double(),
              tokens[:n], tokens[n:])
    ours = LOSSES[name](b, LossParams(beta=beta, label_smoothing=eps)).mean().item()
    assert ours == pytest.approx(trl_loss, rel=1e-4, abs=1e-5), name
