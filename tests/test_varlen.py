"""stages/core/scoring/varlen.py: packed rows as variable-length documents, held equal to the dense 4D-mask
path (float32, 1e-4) at the attention itself (a 4k-token row), in the scorer, and in training with
activation checkpointing, whose recompute in backward must reach the same attention. On CPU the
documents run through the reference kernel; tests/test_gpu.py holds the flash kernels to it."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import make_tiny_model, record_inputs

from stages.core.runtime.models import enable_activation_checkpointing
from stages.core.scoring import attention, packing, varlen
from stages.core.scoring.packing import pack_rows, pair_rows
from stages.core.scoring.truncation import Truncation
from stages.core.training.losses import LossParams
from stages.core.training.policy_pass import PassContext, run_pairs


def test_documents_by_hand():
    """Row 0 at 0: prefix 2, first 3, second 2. Row 1 at 7: prefix 1, first 2, no second. Documents: row 0's
    prefix + first (5 queries, their own 5 keys), row 0's second (2 queries over the prefix's 2 keys and its
    own 2), row 1 (3 and 3)."""
    docs = varlen.docs_of([(0, 2, 3, 2), (7, 1, 2, 0)])
    assert docs.bounds_q == (0, 5, 7, 10) and docs.bounds_k == (0, 5, 9, 12)
    assert docs.cu_q.tolist() == [0, 5, 7, 10] and docs.cu_q.dtype == torch.int32
    assert docs.key_index.tolist() == [0, 1, 2, 3, 4, 0, 1, 5, 6, 7, 8, 9]
    assert (docs.max_q, docs.max_k) == (5, 5)
    # no second anywhere: every document's keys are its own queries, so nothing is gathered
    assert varlen.docs_of([(0, 2, 3, 0), (5, 1, 1, 0)]).key_index is None


def test_pack_varlen_is_unpadded_and_maskless():
    rows = pair_rows(0, [5, 6, 7], [8, 9], [10], Truncation(None)) + pair_rows(1, [11], [12, 13], [], Truncation(None))
    inputs, r, cols, labels, seq_ids = varlen.pack_varlen(rows, 0)
    assert inputs["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10, 11, 12, 13]]  # no padding at all
    assert inputs["position_ids"].tolist() == [[0, 1, 2, 3, 4, 3, 0, 1, 2]]  # second restarts after the prefix
    assert "attention_mask" not in inputs and isinstance(inputs[varlen.KWARG], varlen.Docs)
    assert labels.tolist() == [8, 9, 10, 12, 13] and cols.tolist() == [2, 3, 2, 6, 7]
    assert seq_ids.tolist() == [0, 0, 1, 2, 2] and r.tolist() == [0] * 5


def _rows(rng: random.Random, lengths):
    ids = lambda n: [rng.randrange(100, 40000) for _ in range(n)]  # noqa: E731
    return [row for j, (p, c, r) in enumerate(lengths)
            for row in pair_rows(j, ids(p), ids(c), ids(r), Truncation(None))]


def test_attention_equals_dense_rows_on_a_four_thousand_token_row_with_gradients():
    """A 4k-token row (a 2k prompt, two 1k answers), a short one and one without a second answer, at the
    attention itself: the documents give what sdpa gives under the dense path's own 4D mask of each row, and
    so do the gradients of query, key and value (GQA: 4 query heads over 2 key heads)."""
    rng = random.Random(5)
    rows = _rows(rng, [(2000, 1000, 1000), (150, 40, 60), (30, 20, 0)])
    inputs, *_ = varlen.pack_varlen(rows, 0)
    t = inputs["input_ids"].size(1)
    assert t == sum(packing.row_width(r) for r in rows) >= 4096
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, h, t, 16, requires_grad=True) for h in (4, 2, 2))
    got, _ = varlen.attention_forward(None, q, k, v, None, scaling=0.25, **{varlen.KWARG: inputs[varlen.KWARG]})
    weights = torch.randn_like(got)
    grads = torch.autograd.grad((got * weights).sum(), (q, k, v))
    at, ref_out = 0, []
    for row in rows:  # each row's own dense mask and positions, as the dense path builds them
        dense, *_ = pack_rows([row], 0, torch.float32)
        w = packing.row_width(row)
        assert torch.equal(inputs["position_ids"][0, at:at + w], dense["position_ids"][0])
        kv = [x[:, :, at:at + w].repeat_interleave(2, dim=1) for x in (k, v)]
        ref_out.append(torch.nn.functional.scaled_dot_product_attention(
            q[:, :, at:at + w], *kv, scale=0.25, attn_mask=dense["attention_mask"]).transpose(1, 2))
        at += w
    ref = torch.cat(ref_out, dim=1)
    assert (got - ref).abs().max() < 1e-4
    for g, r in zip(grads, torch.autograd.grad((ref * weights).sum(), (q, k, v))):
        assert (g - r).abs().max() < 1e-4


@pytest.mark.slow
def test_scorer_varlen_equals_dense_without_a_mask(tiny_model_dir):
    """The scorer's varlen path gives the dense path's log-probs over several forwards (a 200-token budget),
    and builds no mask: pack_rows is never called, no forward carries an attention mask."""
    from stages.core.scoring.scorer import ReferenceScorer

    rng = random.Random(0)
    rows = _rows(rng, [(rng.randint(1, 100), rng.randint(1, 100), rng.randint(0, 100)) for _ in range(6)])
    make = lambda a, **kw: ReferenceScorer(tiny_model_dir, "float32", Truncation(None), attention=a,  # noqa: E731
                                           device="cpu", **kw)
    dense = make("dense").score_packed(rows, 12)
    flat = make("varlen", tokens_per_forward=200)
    assert flat.attention == "varlen" and flat.pack
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(packing, "pack_rows", lambda *a, **kw: pytest.fail("the varlen path built a dense mask"))
        seen = record_inputs(mp, varlen, "pack_varlen")
        got = flat.score_packed(rows, 12)
    assert len(seen) > 1 and all("attention_mask" not in inputs for inputs in seen)
    assert max(abs(a - b) for a, b in zip(dense, got)) < 1e-4
    assert all(abs(a) > 0 for a in got)
    assert flat.model.config._attn_implementation == "sdpa"  # set back after each forward


def test_training_with_checkpointing_equals_dense(tokenizer):
    """A training pass (run_pairs: forwards, then backward outside `forward`) with activation checkpointing:
    the varlen path's loss sums and gradients equal the dense path's. The recompute inside backward runs
    the layers again; were the attention not held over backward it would run sdpa over the whole flat
    sequence, with no error and other gradients."""
    rng = random.Random(7)
    ids = lambda n: [rng.randrange(100, 40000) for _ in range(n)]  # noqa: E731
    pairs = [{"prompt_ids": ids(rng.randint(1, 60)), "chosen_ids": ids(rng.randint(1, 50)),
              "rejected_ids": ids(rng.randint(1, 50)), "ref_chosen_logps": -50.0, "ref_rejected_logps": -60.0,
              "chosen_scored_tokens": 1, "rejected_scored_tokens": 1} for _ in range(4)]
    sums, grads = {}, {}
    for path in ("dense", "varlen"):
        model = make_tiny_model(tokenizer, seed=2).train()
        enable_activation_checkpointing(model)
        ctx = PassContext(2, Truncation(None), 0, "cpu", "float32", (("sigmoid", 1.0),),
                          LossParams(0.1, 0.0, 0.05, 0.5), attention=path)
        sums[path] = run_pairs(model, pairs, ctx, 4.0, 10.0, train=True)
        grads[path] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        assert model.config._attn_implementation == "sdpa"
    assert torch.allclose(sums["dense"], sums["varlen"], atol=1e-4, rtol=1e-6)
    assert grads["dense"].keys() == grads["varlen"].keys() and len(grads["dense"]) > 5
    for name, g in grads["dense"].items():
        assert torch.allclose(g, grads["varlen"][name], atol=1e-5, rtol=1e-4), name


def test_resolve_and_the_models_own_attention(tokenizer):
    from stages.core.config.engine import ConfigError

    model = make_tiny_model(tokenizer, seed=1, hidden=64)  # heads of 16
    assert attention.resolve("auto", "cpu", model) == "dense"
    assert attention.resolve("auto", "cuda", model) == "flex"
    assert attention.resolve("varlen", "cpu", model, backward=True) == "varlen"
    with pytest.raises(ConfigError, match="one of auto, dense, flex, varlen"):
        attention.resolve("paged", "cpu", model)
    flash = type("M", (), {"config": type("C", (), {"_attn_implementation": "flash_attention_2"})()})()
    # a flash-attention model: flex cannot take it; auto falls back to varlen where a flash varlen kernel is
    assert attention.resolve("auto", "cuda", flash) == ("varlen" if varlen.fast_kernel_available() else "dense")
    with pytest.raises(ConfigError, match="flash_attention_2"):
        attention.resolve("flex", "cuda", flash)
    # inside a held path, the model's own attention still decides (nested blocks resolve alike)
    with attention.attention_in(model, "varlen"):
        assert model.config._attn_implementation == varlen.NAME
        assert attention.own_implementation(model) == "sdpa"
        assert attention.resolve("auto", "cuda", model) == "flex"
        with attention.attention_in(model, "varlen"):
            pass
        assert model.config._attn_implementation == varlen.NAME
    assert model.config._attn_implementation == "sdpa" and attention.own_implementation(model) == "sdpa"


def test_resolve_keeps_models_the_flat_paths_cannot_compute_dense(tokenizer):
    """Heads under 16 dimensions: no compiled flex on CUDA (auto takes varlen). Logit soft-capping, attention
    sinks, a model spread over devices: auto stays dense, and a flat path asked for is refused by name; the
    attention functions refuse such keywords too, for a model resolve did not see."""
    from stages.core.config.engine import ConfigError
    from stages.core.scoring.flat import unsupported

    fast = "varlen" if varlen.fast_kernel_available() else "dense"
    small = make_tiny_model(tokenizer, seed=1)  # heads of 8
    assert attention.resolve("auto", "cuda", small) == fast
    with pytest.raises(ConfigError, match="16 dimensions or more .*have 8"):
        attention.resolve("flex", "cuda", small)
    assert attention.resolve("flex", "cpu", small) == "flex"  # unfused on CPU: any head size

    capped = make_tiny_model(tokenizer, seed=1, hidden=64)
    capped.config.attn_logit_softcapping = 50.0
    sinks = make_tiny_model(tokenizer, seed=1, hidden=64)
    sinks.model.layers[0].self_attn.sinks = torch.nn.Parameter(torch.zeros(4))
    spread = make_tiny_model(tokenizer, seed=1, hidden=64)
    spread.hf_device_map = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 1, "lm_head": 1}
    for model, why in ((capped, "soft-caps logits"), (sinks, "sinks"), (spread, "spread over 2 devices")):
        assert attention.resolve("auto", "cuda", model) == "dense"
        for path in ("flex", "varlen"):
            with pytest.raises(ConfigError, match=f"{path} cannot score this model: .*{why}"):
                attention.resolve(path, "cuda", model)
    spread.hf_device_map = {"": 0}  # one device: flat paths fine
    assert attention.resolve("auto", "cuda", spread) == "flex"
    for kwargs in ({"softcap": 50.0}, {"s_aux": torch.zeros(4)}):
        with pytest.raises(RuntimeError, match="use attention dense"):
            unsupported(kwargs)
    unsupported({"softcap": None, "sliding_window": None})


def test_kernel_choice():
    assert varlen.kernel("cpu", torch.bfloat16) == "reference"
    assert varlen.kernel("cuda", torch.float32) == "reference"  # flash kernels take fp16 / bf16 only
    if varlen.fast_kernel_available():
        assert varlen.kernel("cuda", torch.bfloat16) in ("torch", "flash_attn")


@pytest.mark.slow
def test_train_attention_varlen_runs_as_dense(refs, tmp_path):
    """`train --attention varlen --gradient-checkpointing` on CPU (the reference kernel): the run's metrics,
    eval included, are the dense run's."""
    from stages import train
    from stages.core.config.options import TrainConfig
    from stages.core.training.metrics import TIMING, read

    runs = {}
    for path in ("dense", "varlen"):
        train.run(TrainConfig(refs=str(refs), output=str(tmp_path / path), batch_size=4, micro_batch_size=2,
                              learning_rate=1e-3, shuffle_buffer=6, progress=False, seed=3, max_steps=2,
                              gradient_checkpointing=True, attention=path))
        runs[path] = [{k: v for k, v in r.items() if k not in TIMING}
                      for r in read(str(tmp_path / path / "metrics.jsonl"))]
    assert len(runs["dense"]) == len(runs["varlen"]) >= 2
    for a, b in zip(runs["dense"], runs["varlen"]):
        assert a.keys() == b.keys()
        assert all(a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-5) for k in a if isinstance(a[k], float)), (a, b)


def test_autocast_inputs_reach_the_kernel_in_its_dtype(monkeypatch):
    """Under bf16 autocast, rotary embeddings leave q and k in float32 beside a bf16 v (autocast casts sdpa's
    inputs, not a custom kernel's): the documents' kernel gets all three in bf16, so on CUDA a flash kernel
    (bf16 only) is the one chosen."""
    rows = pair_rows(0, [5, 6, 7], [8, 9], [10, 11], Truncation(None))
    inputs, *_ = varlen.pack_varlen(rows, 0)
    t = inputs["input_ids"].size(1)
    q, k = torch.randn(1, 4, t, 16), torch.randn(1, 2, t, 16)
    v = torch.randn(1, 2, t, 16, dtype=torch.bfloat16)
    chosen = []
    real = varlen.kernel
    monkeypatch.setattr(varlen, "kernel", lambda device, dtype: chosen.append(dtype) or real(device, dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = varlen.attention_forward(None, q, k, v, None, scaling=0.25, **{varlen.KWARG: inputs[varlen.KWARG]})
    assert chosen == [torch.bfloat16] and out.dtype == torch.bfloat16
    ref, _ = varlen.attention_forward(None, q, k, v.float(), None, scaling=0.25,
                                      **{varlen.KWARG: inputs[varlen.KWARG]})
    assert (out.float() - ref).abs().max() < 5e-2
