"""CUDA paths: the packed scorer layout and the training forward on a GPU, fp32 and bf16.

Marked `gpu`: skipped (conftest) where torch sees no CUDA device, as on CI.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model
from oracle import exact_logps

from stages.core.config import TrainConfig
from stages.core.layout import pack_rows, pair_rows
from stages.core.logprobs import scored_logps
from stages.core.models import enable_activation_checkpointing
from stages.core.policy_pass import forward, pass_context

pytestmark = pytest.mark.gpu


def _pairs(tokenizer, n=6, seed=3):
    g = torch.Generator().manual_seed(seed)
    r = lambda lo, hi: torch.randint(0, len(tokenizer), (int(torch.randint(lo, hi, (1,), generator=g)),),  # noqa: E731
                                     generator=g).tolist()
    return [(r(2, 40), r(1, 30), r(1, 30)) for _ in range(n)]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-3), (torch.bfloat16, 0.5)])
def test_packed_scoring_on_cuda_matches_cpu_oracle(tokenizer, dtype, tol):
    cpu = make_tiny_model(tokenizer, seed=2)
    gpu = make_tiny_model(tokenizer, seed=2).to("cuda", dtype)
    pairs = _pairs(tokenizer)
    rows = [row for j, (p, c, rj) in enumerate(pairs) for row in pair_rows(j, p, c, rj, None, "keep_start")]
    inputs, r, c, labels, seq_ids = pack_rows(rows, tokenizer.pad_token_id, dtype, "cuda")
    with torch.inference_mode():
        got = scored_logps(gpu, inputs, r, c, labels, seq_ids, 2 * len(pairs)).cpu()
    assert got.dtype == torch.float64
    for j, (p, ch, rj) in enumerate(pairs):
        assert abs(float(got[2 * j]) - exact_logps(cpu, p + ch, len(p))) < tol
        assert abs(float(got[2 * j + 1]) - exact_logps(cpu, p + rj, len(p))) < tol


def test_training_forward_backward_bf16_autocast_on_cuda(tokenizer):
    model = make_tiny_model(tokenizer, seed=4).to("cuda").train()
    enable_activation_checkpointing(model)
    pairs = [{"prompt_ids": p, "chosen_ids": c, "rejected_ids": r} for p, c, r in _pairs(tokenizer, 4, 9)]
    ctx = pass_context(TrainConfig(dtype="bfloat16"), {"max_length": None, "truncation_mode": "keep_start"},
                       tokenizer.pad_token_id, "cuda")
    chosen, rejected, _ = forward(model, pairs, ctx)
    (chosen - rejected).sigmoid().log().sum().backward()
    assert torch.isfinite(chosen).all() and torch.isfinite(rejected).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
