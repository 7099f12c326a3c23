"""stages/core/scoring/flex.py: packed rows under FlexAttention block masks, held equal to the dense
4D-mask path (float32, 1e-4) in the scorer and in the policy's pass, with gradients; the block lists
against a brute-force mask; no dense (T, T) tensor on the flex path. (On CPU flex runs unfused.)"""

from __future__ import annotations

import random

import pytest
import torch
from conftest import make_tiny_model, record_inputs

from stages.core.scoring import flex, packing
from stages.core.scoring.packing import forward_budget, pair_rows, plan_flat
from stages.core.scoring.truncation import Truncation

pytestmark = pytest.mark.skipif(not flex.available(), reason="needs torch.nn.attention.flex_attention")


@pytest.fixture(scope="module")
def model(tokenizer):
    return make_tiny_model(tokenizer, seed=1)


def random_rows(rng: random.Random, pairs: int, longest: int = 150, keep_end_cuts: bool = True):
    """pair_rows of random pairs: some with an empty rejected answer, and (keep_end cutting the prompt
    differently for each answer) some split into two rows."""
    ids = lambda n: [rng.randrange(100, 40000) for _ in range(n)]  # noqa: E731
    rows = []
    for j in range(pairs):
        cut = Truncation(120, None, "keep_end") if keep_end_cuts and j % 3 == 2 else Truncation(None)
        rows += pair_rows(j, ids(rng.randint(1, longest)), ids(rng.randint(1, longest)),
                          ids(rng.randint(0, longest)), cut)
    return rows


def brute_force(starts, hide_lo, hide_hi):
    q = torch.arange(starts.numel()).unsqueeze(1)
    k = torch.arange(starts.numel()).unsqueeze(0)
    return (k >= starts.unsqueeze(1)) & (k <= q) & ~((k >= hide_lo.unsqueeze(1)) & (k < hide_hi.unsqueeze(1)))


def test_block_lists_match_the_mask_they_compress():
    """Small blocks (8 tokens) so that rows start and end inside blocks: every block the brute-force mask
    touches partly is listed partial, every block it fills is listed full, the rest neither."""
    rng = random.Random(3)
    rows = random_rows(rng, 6, longest=20)
    inputs, *_ = flex.pack_flat(rows, 0, block=8)
    mask = inputs["attention_mask"]
    length = inputs["input_ids"].size(1)
    assert length % 8 == 0 and length - 8 < sum(packing.row_width(r) for r in rows) <= length
    dense = mask.to_dense()[0, 0].bool()  # the BlockMask's own block view: (nq, nk)
    starts, lo, hi = (torch.tensor(v) for v in _intervals(rows, length))
    truth = brute_force(starts, lo, hi).view(length // 8, 8, length // 8, 8).sum((1, 3))
    assert torch.equal(dense, truth > 0)
    partial, full = flex.block_lists(starts, lo, hi, block=8)
    assert torch.equal(full, truth == 64) and torch.equal(partial, (truth > 0) & (truth < 64))


def _intervals(rows, length):
    """The per-token intervals pack_flat lays out, rebuilt independently from the rows."""
    starts, lo, hi, at = [], [], [], 0
    for p, c, r, _, _ in rows:
        lp, lc, lr = len(p), len(c), len(r)
        starts += [at] * (lp + lc + lr)
        lo += [0] * (lp + lc) + [at + lp] * lr
        hi += [0] * (lp + lc) + [at + lp + lc] * lr
        at += lp + lc + lr
    pad = length - at
    return starts + [at] * pad, lo + [0] * pad, hi + [0] * pad


def scorer(tiny_model_dir, attention, **kw):
    from stages.core.scoring.scorer import ReferenceScorer

    return ReferenceScorer(tiny_model_dir, "float32", Truncation(None), attention=attention, device="cpu", **kw)


@pytest.mark.slow
def test_scorer_flex_equals_dense(tiny_model_dir):
    """The scorer's flex path gives the dense path's log-probs (several forwards: a 200-token budget), and
    does so without building a dense mask: pack_rows is never called, the mask is a BlockMask."""
    rng = random.Random(0)
    rows = random_rows(rng, 6, longest=100)
    n = 12
    dense = scorer(tiny_model_dir, "dense").score_packed(rows, n)
    flat = scorer(tiny_model_dir, "flex", tokens_per_forward=200)
    assert flat.attention == "flex" and flat.pack
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(packing, "pack_rows", lambda *a, **kw: pytest.fail("the flex path built a dense mask"))
        seen = record_inputs(mp, flex, "pack_flat")
        got = flat.score_packed(rows, n)
    assert len(seen) > 1  # the budget cut the rows into several forwards
    from torch.nn.attention.flex_attention import BlockMask

    widest = max(packing.row_width(r) for r in rows)
    for inputs in seen:  # no forward over the budget (or over the widest row, which goes alone), padded to blocks
        assert isinstance(inputs["attention_mask"], BlockMask)
        assert inputs["input_ids"].size(1) <= -(-max(200, widest) // 128) * 128
    assert max(abs(a - b) for a, b in zip(dense, got)) < 1e-4
    assert all(abs(a) > 0 for a in got)


@pytest.mark.slow
def test_four_thousand_token_rows_and_a_mask_that_grows_by_blocks():
    """A 4k-token row (a 2k prompt, two 1k answers) and a short one after it, at the attention itself (the
    only place the two paths differ; the whole model is held equal above, on shorter rows: unfused flex on
    CPU takes ~10 s a layer at 4k): FlexAttention under the BlockMask gives what sdpa gives under the
    dense path's own 4D masks (pack_rows, one per row), positions are the dense path's, and no tensor of
    the BlockMask holds more than (T / 128)^2 entries, where a dense mask holds T^2."""
    from stages.core.scoring.packing import pack_rows

    rng = random.Random(5)
    ids = lambda n: [rng.randrange(100, 40000) for _ in range(n)]  # noqa: E731
    rows = pair_rows(0, ids(2000), ids(1000), ids(1000), Truncation(None)) + \
        pair_rows(1, ids(150), ids(40), ids(60), Truncation(None))
    inputs, *_ = flex.pack_flat(rows, 0)
    t = inputs["input_ids"].size(1)
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, t, 16), torch.randn(1, 2, t, 16), torch.randn(1, 2, t, 16)
    got, _ = flex.attention_forward(None, q, k, v, inputs["attention_mask"], scaling=0.25)
    at = 0
    for row in rows:  # each row's own dense mask and positions, as the dense path builds them
        dense, *_ = pack_rows([row], 0, torch.float32)
        w = packing.row_width(row)
        assert torch.equal(inputs["position_ids"][0, at:at + w], dense["position_ids"][0])
        kv = [x[:, :, at:at + w].repeat_interleave(2, dim=1) for x in (k, v)]  # GQA: 2 query heads per kv head
        ref = torch.nn.functional.scaled_dot_product_attention(q[:, :, at:at + w], *kv, scale=0.25,
                                                               attn_mask=dense["attention_mask"])
        assert (got[:, at:at + w] - ref.transpose(1, 2)).abs().max() < 1e-4
        at += w
    blocks = (t // flex.BLOCK) ** 2
    assert t >= 4096
    for value in inputs["attention_mask"].as_tuple(flatten=True):
        if isinstance(value, torch.Tensor):
            assert value.numel() <= blocks, value.shape


def test_policy_pass_flex_equals_dense_and_refuses_cpu_gradients(tokenizer):
    """The policy's pass (eval: no gradients) on the flex path gives the dense path's log-probs. Training
    on flex needs CUDA (FlexAttention has no CPU backward; tests/test_gpu.py holds the gradients equal):
    asked for on CPU it is refused by name, and auto trains on the dense path."""
    from stages.core.config.engine import ConfigError
    from stages.core.training.losses import LossParams
    from stages.core.training.policy_pass import PassContext, forward

    rng = random.Random(7)
    ids = lambda n: [rng.randrange(100, 40000) for _ in range(n)]  # noqa: E731
    pairs = [{"prompt_ids": ids(rng.randint(1, 60)), "chosen_ids": ids(rng.randint(1, 50)),
              "rejected_ids": ids(rng.randint(1, 50))} for _ in range(3)]
    model = make_tiny_model(tokenizer, seed=2)
    ctx = lambda attention: PassContext(3, Truncation(None), 0, "cpu", "float32", (("sigmoid", 1.0),),  # noqa: E731
                                        LossParams(0.1, 0.0, 0.05, 0.5), attention=attention)
    with torch.no_grad():
        dense = torch.cat(forward(model, pairs, ctx("dense"))[:2])
        got = torch.cat(forward(model, pairs, ctx("flex"))[:2])
    assert torch.allclose(dense, got, atol=1e-4, rtol=0)
    with pytest.raises(ConfigError, match="flex trains only on CUDA"):
        forward(model, pairs, ctx("flex"))
    chosen, _, _ = forward(model, pairs, ctx("auto"))
    assert chosen.requires_grad


def test_resolve_picks_dense_on_cpu_and_refuses_what_cannot_run(tokenizer):
    from stages.core.config.engine import ConfigError
    from stages.core.scoring.attention import resolve

    model = make_tiny_model(tokenizer, seed=1, hidden=64)  # heads of 16: compiled flex's least on CUDA
    assert resolve("auto", "cpu", model) == "dense"
    assert resolve("auto", "cuda", model) == "flex"
    assert resolve("flex", "cpu", model) == "flex"
    assert resolve("dense", "cuda", model) == "dense"
    with pytest.raises(ConfigError, match="flex trains only on CUDA"):
        resolve("flex", "cpu", model, backward=True)


def test_forward_budget_and_flat_plan_by_hand():
    # 1B shape in bf16: 2 * (4 * 2048 + 3 * 8192) = 65,536 B a token; 80 GB free -> capped at 65,536 tokens
    assert forward_budget(80 * 10**9, 2048, 8192, 2) == 65536
    # 4 GB free: a quarter is 1e9 B -> 15,258 tokens fit -> 8,192 (powers of two, not below the CPU's budget)
    assert forward_budget(4 * 10**9, 2048, 8192, 2) == 8192
    # 8B shape (4096, 14336) in bf16: 118,784 B a token; 40 GB free -> 84,182 fit -> 65,536
    assert forward_budget(40 * 10**9, 4096, 14336, 2) == 65536
    assert forward_budget(20 * 10**9, 4096, 14336, 2) == 32768
    # widths 5, 3, 8, 2 under 10 tokens: longest first, each into the first forward with room
    assert plan_flat([5, 3, 8, 2], 10) == [[2, 3], [0, 1]]
    assert plan_flat([12, 4], 10) == [[0], [1]]  # a row over the budget goes alone


def test_the_attention_setting_on_every_command_that_scores():
    from stages.core.config.engine import ConfigError
    from stages.core.config.options import EvalConfig, PrecomputeConfig, TrainConfig

    for cls in (PrecomputeConfig, TrainConfig, EvalConfig):
        assert cls().attention == "auto" and cls(attention="flex").attention == "flex"
    assert PrecomputeConfig().tokens_per_forward is None and PrecomputeConfig(tokens_per_forward=4096)
    with pytest.raises(ConfigError, match="tokens_per_forward"):
        PrecomputeConfig(tokens_per_forward=0)
