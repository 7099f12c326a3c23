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

from stages.core.config import PrecomputeConfig, TrainConfig
from stages.core.formats import normalise
from stages.core.losses import LOSSES, Batch, LossParams
from stages.core.policy_pass import forward, loss_batch, means, pass_context, run_pairs
from stages.core.tokenization import scored_sequence, tokenize_row

pytest.importorskip("trl")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
MANIFEST = {"max_length": 128, "truncation_mode": "keep_start"}


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
    real = [tokenize_row(tokenizer, normalise(r, "standard", PrecomputeConfig())) for r in hh_rows(4)]
    cut = [{"prompt_ids": p["prompt_ids"][:1], "chosen_ids": p["prompt_ids"][1:] + p["chosen_ids"],
            "rejected_ids": p["prompt_ids"][1:] + p["rejected_ids"]} for p in real]
    trl = bare(ORPOTrainer, beta=beta, is_encoder_decoder=False, padding_value=pad, aux_loss_enabled=False)
    ctx = pass_context(TrainConfig(loss_type="orpo", beta=beta, micro_batch_size=4),
                       {"max_length": None, "truncation_mode": "keep_start"}, pad, "cpu")

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
    assert (orpo - sft).mean().item() == pytest.approx(trl_loss - trl_nll, rel=1e-5, abs=1e-6)
    trl_cut_loss, trl_cut_nll, orpo_cut, sft_cut = both(cut)
    # `cut` holds the same sequences with everything after the first token scored: TRL's NLL on the real
    # pairs is this full-sequence token mean (prompt included), not our completion-only one.
    assert trl_nll == pytest.approx(sft_cut.mean().item(), rel=1e-5)
    assert sum(len(p["chosen_ids"]) for p in cut) > 2 * sum(len(p["chosen_ids"]) for p in real)  # prompts count
    assert sft_cut.mean().item() == pytest.approx(trl_cut_nll, rel=1e-5)
    assert orpo_cut.mean().item() == pytest.approx(trl_cut_loss, rel=1e-5)

def test_one_dpo_step_matches_trl_dpo_trainer(tokenizer, tmp_path):
    """One AdamW step from identical weights, on the same pairs and reference log-probs: our
    run_pairs + clip + fused AdamW (as trainer.train_step) vs TRL's DPOTrainer.train(max_steps=1).
    Compares the loss, the pre-clip gradient norm and every updated weight."""
    from conftest import make_tiny_model
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    class InOrder(DPOTrainer):  # the batch is all pairs anyway; in order, so TRL's columns line up with ours
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    trl_grads = {}

    class KeepGrads(TrainerCallback):
        def on_pre_optimizer_step(self, *args, **kwargs):  # after TRL's clipping, before its AdamW step
            trl_grads.update({k: v.grad.detach().clone() for k, v in model.named_parameters()})

    n, beta, lr, clip = 4, 0.3, 1e-3, 1.0
    model = make_tiny_model(tokenizer, seed=2)
    ours_model = copy.deepcopy(model)  # before TRL patches model.forward with its fused LM head
    args = DPOConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, bf16=False, max_length=MANIFEST["max_length"],
                     truncation_mode="keep_start", beta=beta, learning_rate=lr, lr_scheduler_type="constant",
                     warmup_steps=0, weight_decay=0.0, max_grad_norm=clip, optim="adamw_torch_fused", max_steps=1,
                     per_device_train_batch_size=n, gradient_accumulation_steps=1, gradient_checkpointing=False,
                     logging_steps=1, save_strategy="no", disable_tqdm=True, precompute_ref_log_probs=False)
    trainer = InOrder(model=model, ref_model=copy.deepcopy(model), args=args, processing_class=tokenizer,
                      callbacks=[KeepGrads()],
                      train_dataset=Dataset.from_list([{k: r[k] for k in ("chosen", "rejected")} for r in hh_rows(n)]))
    pairs = [{k: list(trainer.train_dataset[i][k]) for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
             for i in range(n)]
    for i, p in enumerate(pairs):
        seqs = [scored_sequence(p["prompt_ids"], p[k], MANIFEST["max_length"], "keep_start") for k in
                ("chosen_ids", "rejected_ids")]
        p.update(pair_id=str(i), chosen_scored_tokens=len(seqs[0][0]) - max(seqs[0][1], 1),
                 rejected_scored_tokens=len(seqs[1][0]) - max(seqs[1][1], 1))
    ctx = pass_context(TrainConfig(beta=beta, micro_batch_size=2, gradient_checkpointing=False), MANIFEST,
                       tokenizer.pad_token_id, "cpu")
    # Reference log-probs: the initial policy's, shifted a few nats per pair so beta * delta is O(1), not the
    # ln 2 point; rounded to float32 since TRL's collator makes a float32 tensor of them.
    with torch.no_grad():
        chosen, rejected, _ = forward(ours_model, pairs, ctx)
    g = torch.Generator().manual_seed(3)
    for p, c, r in zip(pairs, chosen.tolist(), rejected.tolist()):
        p["ref_chosen_logps"] = float(torch.tensor(c + 4 * torch.randn(1, generator=g).item(), dtype=torch.float32))
        p["ref_rejected_logps"] = float(torch.tensor(r + 4 * torch.randn(1, generator=g).item(), dtype=torch.float32))
    # TRL's state after its own precompute_ref_log_probs: the columns in the dataset and the flag set. Its
    # precompute would write a datasets cache file and use its own numbers, so the values are given instead.
    for key in ("ref_chosen_logps", "ref_rejected_logps"):
        trainer.train_dataset = trainer.train_dataset.add_column(key, [p[key] for p in pairs])
    trainer.precompute_ref_logps = True
    trainer.train()
    logged = next(h for h in trainer.state.log_history if "grad_norm" in h)

    ours_model.train()
    start = {k: v.detach().clone() for k, v in ours_model.named_parameters()}
    sums = run_pairs(ours_model, pairs, ctx, n, float(sum(p["chosen_scored_tokens"] for p in pairs)), train=True)
    norm = torch.nn.utils.clip_grad_norm_(list(ours_model.parameters()), clip)
    grad_diff = max((v.grad - trl_grads[k]).abs().max().item() for k, v in ours_model.named_parameters())
    grad_max = max(v.abs().max().item() for v in trl_grads.values())
    torch.optim.AdamW(ours_model.parameters(), lr=lr, weight_decay=0.0, fused=True).step()

    trl_params = dict(model.named_parameters())
    moved = max((v - start[k]).abs().max().item() for k, v in ours_model.named_parameters())
    diff = max((v - trl_params[k]).abs().max().item() for k, v in ours_model.named_parameters())
    print(f"loss {means(sums)['loss']:.8f} vs {logged['loss']:.8f}, grad_norm {float(norm):.6f} vs "
          f"{logged['grad_norm']:.6f}, max weight change {moved:.3e}, max diff to TRL {diff:.3e}, "
          f"grad diff {grad_diff:.3e} of max {grad_max:.3e}")
    # float32 on both sides, different kernels (our packed 4D-mask rows and float64 sums vs TRL's padded
    # batch and fused, chunked LM head, which TRL 1.16 always uses: DPOConfig has no switch to turn it off).
    assert abs(means(sums)["loss"] - 0.6931) > 0.05  # a loss away from ln 2, so the refs matter
    assert means(sums)["loss"] == pytest.approx(logged["loss"], rel=1e-5)
    assert float(norm) > clip and float(norm) == pytest.approx(logged["grad_norm"], rel=1e-4)  # clipping is active
    assert moved > 0.5 * lr  # Adam's first step moves weights by about lr: equality below is not trivial
    assert diff < 1e-3 * lr
