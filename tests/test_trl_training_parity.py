"""SimPO, ORPO and one DPO optimizer step against trl 1.16.0's own code on the same inputs.

SimPO and ORPO live in TRL's experimental CPOTrainer / ORPOTrainer, which this project does not
run: their loss methods are called on a bare instance holding only the attributes they read, so
the numbers come from TRL's code, not a copy of it. The DPO step runs TRL's DPOTrainer.train().
"""

from __future__ import annotations

import copy
import math
import os
from types import SimpleNamespace

import pytest
import torch

from stages.core.config.options import TrainConfig
from stages.core.inputs.formats import Columns, normalise
from stages.core.inputs.tokenization import tokenize_row
from stages.core.scoring.truncation import Truncation
from stages.core.training.losses import LOSSES, Batch, LossParams
from stages.core.training.policy_pass import forward, loss_batch, means, pass_context, run_pairs

pytest.importorskip("trl")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
MAX_LENGTH = 128
# What pass_context reads of a manifest: its kind and its truncation.
MANIFEST = SimpleNamespace(kind="paired", truncation=Truncation(MAX_LENGTH))


def bare(cls, **attrs):
    """A TRL trainer without __init__ (no model, dataset or accelerator setup): its methods only read `attrs`."""
    obj = object.__new__(cls)
    obj.__dict__.update(accelerator=SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x),
                        **attrs)
    return obj


def hh_rows(n: int) -> list[dict]:
    from conftest import HH_SAMPLE, read_jsonl_gz

    return [r for r in read_jsonl_gz(HH_SAMPLE, 60) if r["chosen"] != r["rejected"] and len(r["chosen"]) < 600][:n]


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_simpo_matches_trl_cpo_loss(label_smoothing):
    """Our SimPO on summed log-probs + token counts == TRL's CPOTrainer.cpo_loss(loss_type="simpo") on the
    per-token averages TRL's concatenated_forward hands it (get_batch_logps with average_log_prob=True)."""
    from trl.experimental.cpo import CPOTrainer

    g = torch.Generator().manual_seed(0)
    n = 8
    nc, nr = torch.randint(3, 120, (n,), generator=g).double(), torch.randint(3, 120, (n,), generator=g).double()
    # Per-token averages about -1.0 (chosen) and -1.8 (rejected) nats with spread: beta * margin - gamma takes
    # both signs, so the batch has pairs on both sides of the margin.
    pc = nc * (-1.0 + 0.5 * torch.randn(n, generator=g, dtype=torch.float64))
    pr = nr * (-1.8 + 0.5 * torch.randn(n, generator=g, dtype=torch.float64))
    beta, gamma = 2.5, 1.4
    trl = bare(CPOTrainer, beta=beta, simpo_gamma=gamma, label_smoothing=label_smoothing, loss_type="simpo", alpha=0.0)
    trl_losses, _, _ = trl.cpo_loss(pc / nc, pr / nr)
    zero = torch.zeros(n, dtype=torch.float64)
    ours = LOSSES["simpo"](Batch(pc, pr, zero, zero, nc, nr), LossParams(beta, label_smoothing, 0.05, gamma))
    # float64 throughout; TRL computes gamma / beta then multiplies back by beta: a few ulps apart.
    assert ours.tolist() == pytest.approx(trl_losses.tolist(), rel=1e-12)
    assert ours.min() < math.log(2) < ours.max()  # logits of both signs: not a degenerate batch


def test_orpo_matches_trl_orpo_trainer(tokenizer):
    """Our ORPO vs ORPOTrainer.get_batch_loss_metrics (its forward, odds_ratio_loss and NLL) on the same model
    and pairs. The odds-ratio part matches with real prompts. TRL's NLL term is a token mean over the batch's
    chosen sequences *including prompt tokens* ("orpo chosen nll loss is computed over the full prompt and
    response"), ours over chosen completion tokens only; so the totals are compared where the two coincide,
    with each pair's first token as the prompt (the rest of the sequence is the completion)."""
    from conftest import make_tiny_model
    from trl.experimental.orpo import ORPOTrainer

    model = make_tiny_model(tokenizer, seed=1, layers=1)
    beta, pad = 0.25, tokenizer.pad_token_id
    real = [tokenize_row(tokenizer, normalise(r, "standard", Columns())) for r in hh_rows(4)]
    cut = [{"prompt_ids": p["prompt_ids"][:1], "chosen_ids": p["prompt_ids"][1:] + p["chosen_ids"],
            "rejected_ids": p["prompt_ids"][1:] + p["rejected_ids"]} for p in real]
    trl = bare(ORPOTrainer, beta=beta, is_encoder_decoder=False, padding_value=pad, aux_loss_enabled=False)
    ctx = pass_context(TrainConfig(loss_type="orpo", beta=beta, micro_batch_size=4),
                       SimpleNamespace(kind="paired", truncation=Truncation(None)), pad, "cpu")

    def both(pairs):
        """(TRL loss, TRL nll, ours per pair (orpo), ours per pair (sft)) on `pairs`."""
        def padded(key, side):
            seqs = [p["prompt_ids"] + p[f"{side}_ids"] for p in pairs]
            width = max(map(len, seqs))
            if key == "labels":
                seqs = [[-100] * len(p["prompt_ids"]) + p[f"{side}_ids"] for p in pairs]
            fill = {"input_ids": pad, "attention_mask": 0, "labels": -100}[key]
            rows = [[1] * len(s) if key == "attention_mask" else s for s in seqs]
            return torch.tensor([r + [fill] * (width - len(r)) for r in rows])

        batch = {f"{side}_{key}": padded(key, side) for side in ("chosen", "rejected")
                 for key in ("input_ids", "attention_mask", "labels")}
        for p in pairs:
            p.update(ref_chosen_logps=0.0, ref_rejected_logps=0.0, pair_id="x",
                     chosen_scored_tokens=len(p["chosen_ids"]), rejected_scored_tokens=len(p["rejected_ids"]))
        with torch.no_grad():
            loss, metrics = trl.get_batch_loss_metrics(model, batch)
            chosen, rejected, _ = forward(model, pairs, ctx)
        b = loss_batch(pairs, chosen, rejected, float(sum(p["chosen_scored_tokens"] for p in pairs)))
        params = LossParams(beta=beta)
        return loss.item(), metrics["nll_loss"], LOSSES["orpo"](b, params), LOSSES["sft"](b, params)

    # TRL casts the average log-probs to float32 in odds_ratio_loss, its NLL is float32: float32 tolerances.
    trl_loss, trl_nll, orpo, sft = both([dict(p) for p in real])
    assert (orpo - sft).mean().item() == pytest.approx(trl_loss - trl_nll, rel=1e-5)
    trl_cut_loss, trl_cut_nll, orpo_cut, sft_cut = both(cut)
    # `cut` holds the same sequences with everything after the first token scored: TRL's NLL on the real
    # pairs is this full-sequence token mean (prompt included), not our completion-only one.
    assert trl_nll == pytest.approx(sft_cut.mean().item(), rel=1e-5)
    assert abs(trl_nll - sft_cut.mean().item()) < 0.01 * abs(trl_nll - sft.mean().item())
    assert sft_cut.mean().item() == pytest.approx(trl_cut_nll, rel=1e-5)
    assert orpo_cut.mean().item() == pytest.approx(trl_cut_loss, rel=1e-5)
    # A random model's average log-probs are far below 0, where log(1 - p) ~ 0; the odds term matters near 0.
    # TRL's odds_ratio_loss on average log-probs from -0.02 to -3 nats, against ours from sums and counts.
    g = torch.Generator().manual_seed(5)
    nc, nr = torch.randint(3, 60, (2, 16), generator=g).double()
    avg_c, avg_r = -torch.rand(2, 16, generator=g, dtype=torch.float64) * 3 - 0.02
    b = Batch(avg_c * nc, avg_r * nr, torch.zeros(16), torch.zeros(16), nc, nr)
    trl_or = trl.odds_ratio_loss(avg_c, avg_r)[0].double()
    assert (LOSSES["orpo"](b, LossParams(beta=beta)) - LOSSES["sft"](b, LossParams(beta=beta))).tolist() == \
        pytest.approx((-trl_or).tolist(), rel=1e-5)


N, BETA, LR, CLIP = 4, 0.3, 1e-3, 1.0  # DPO step: pairs (all in one optimizer step), beta, learning rate, clip


def trl_dpo_trainer(model, tokenizer, output_dir: str, grads: dict):
    """TRL's DPOTrainer for one step over the first N pairs, in order; fills `grads` with its clipped gradients.
    float32 (bf16 defaults to on in TRL), constant LR without warmup, no activation checkpointing (on by default)."""
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    class InOrder(DPOTrainer):  # the batch is all pairs anyway; in order, so TRL's columns line up with ours
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    class KeepGrads(TrainerCallback):
        def on_pre_optimizer_step(self, *args, **kwargs):  # after TRL's clipping, before its AdamW step
            grads.update({k: v.grad.detach().clone() for k, v in model.named_parameters()})

    args = DPOConfig(output_dir=output_dir, report_to=[], use_cpu=True, bf16=False, max_length=MAX_LENGTH,
                     truncation_mode="keep_start", beta=BETA, learning_rate=LR, lr_scheduler_type="constant",
                     warmup_steps=0, weight_decay=0.0, max_grad_norm=CLIP, optim="adamw_torch_fused", max_steps=1,
                     per_device_train_batch_size=N, gradient_accumulation_steps=1, activation_checkpointing=False,
                     logging_steps=1, save_strategy="no", disable_tqdm=True, precompute_ref_log_probs=False)
    rows = [{k: r[k] for k in ("chosen", "rejected")} for r in hh_rows(N)]
    return InOrder(model=model, ref_model=copy.deepcopy(model), args=args, processing_class=tokenizer,
                   callbacks=[KeepGrads()], train_dataset=Dataset.from_list(rows))


def test_one_dpo_step_matches_trl_dpo_trainer(tokenizer, tmp_path):
    """One AdamW step from identical weights, on the same pairs and reference log-probs: our
    run_pairs + clip + fused AdamW (as trainer.train_step) vs TRL's DPOTrainer.train(max_steps=1).
    Compares the loss, the pre-clip gradient norm, the clipped gradients and every updated weight."""
    from conftest import make_tiny_model

    model = make_tiny_model(tokenizer, seed=2)
    ours_model = copy.deepcopy(model)  # before TRL patches model.forward with its fused LM head
    trl_grads = {}
    trainer = trl_dpo_trainer(model, tokenizer, str(tmp_path), trl_grads)
    pairs = [{k: list(trainer.train_dataset[i][k]) for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
             for i in range(N)]
    for i, p in enumerate(pairs):  # tokens each sum covers, as the scorer writes them: len(seq) - max(start, 1)
        (c, cs), (r, rs) = (Truncation(MAX_LENGTH).scored_sequence(p["prompt_ids"], p[k])
                            for k in ("chosen_ids", "rejected_ids"))
        p.update(pair_id=str(i), chosen_scored_tokens=len(c) - max(cs, 1), rejected_scored_tokens=len(r) - max(rs, 1))
    ctx = pass_context(TrainConfig(beta=BETA, micro_batch_size=2, gradient_checkpointing=False), MANIFEST,
                       tokenizer.pad_token_id, "cpu")
    # Reference log-probs: the initial policy's, shifted a few nats per pair so beta * delta is O(1), not the
    # ln 2 point; rounded to float32 since TRL's collator makes a float32 tensor of them.
    with torch.no_grad():
        chosen, rejected, _ = forward(ours_model, pairs, ctx)
    shift = 4 * torch.randn(2, N, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for key, logps, noise in (("ref_chosen_logps", chosen, shift[0]), ("ref_rejected_logps", rejected, shift[1])):
        for p, v in zip(pairs, (logps + noise).float().tolist()):
            p[key] = v
    # TRL's state after its own precompute_ref_log_probs (columns in the dataset, flag set), with our values.
    for key in ("ref_chosen_logps", "ref_rejected_logps"):
        trainer.train_dataset = trainer.train_dataset.add_column(key, [p[key] for p in pairs])
    trainer.precompute_ref_logps = True
    trainer.train()
    logged = next(h for h in trainer.state.log_history if "grad_norm" in h)

    ours_model.train()
    flat = lambda tensors: torch.cat([t.detach().flatten() for t in tensors])  # noqa: E731  all parameters, in order
    w0 = flat(ours_model.parameters()).clone()
    sums = run_pairs(ours_model, pairs, ctx, N, float(sum(p["chosen_scored_tokens"] for p in pairs)), train=True)
    norm = float(torch.nn.utils.clip_grad_norm_(list(ours_model.parameters()), CLIP))
    g_ours, g_trl = flat(p.grad for p in ours_model.parameters()), flat(trl_grads.values())
    torch.optim.AdamW(ours_model.parameters(), lr=LR, weight_decay=0.0, fused=True).step()
    w_ours, w_trl, loss = flat(ours_model.parameters()), flat(model.parameters()), means(sums)["loss"]

    # float32 on both sides, with different kernels: ours packs each pair into one row (4D mask) and sums
    # log-probs in float64; TRL pads [chosen; rejected] and always uses its fused, chunked LM head (TRL 1.16's
    # DPOConfig has no switch for a plain logits forward). Observed: loss 9e-7 rel, grad_norm 3e-6 rel,
    # clipped gradients 5e-6 (norm of the difference / norm), weights 7e-5, elementwise 6e-8 (6e-5 lr).
    assert abs(loss - math.log(2)) > 0.05  # away from ln 2: the reference log-probs matter
    assert loss == pytest.approx(logged["loss"], rel=1e-5)
    assert norm > CLIP and norm == pytest.approx(logged["grad_norm"], rel=2e-5)  # and clipping is active
    assert (g_ours - g_trl).norm() < 1e-4 * g_trl.norm()
    step = w_trl - w0
    assert step.abs().max() > 0.5 * LR and (step != 0).float().mean() > 0.5  # Adam moved most weights by ~lr
    assert (w_ours - w_trl).norm() < 1e-3 * step.norm()
    # Adam's first step is lr * g / (|g| + eps), eps = 1e-8: where |g| is near eps, float32 noise in g moves
    # the update by a fair part of lr, so weight by weight equality is asked only where |g| >= 100 eps
    # (over a third of the weights here).
    assert (w_ours - w_trl)[g_trl.abs() >= 1e-6].abs().max() < 1e-3 * LR
