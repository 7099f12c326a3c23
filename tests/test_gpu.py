"""CUDA paths: the packed scorer layout and the training forward on a GPU, fp32 and bf16; a reference
spread over two GPUs (--gpus-per-worker 2).

Marked `gpu`: skipped (conftest) where torch sees no CUDA device, as on CI; the two-GPU tests also
skip where fewer than two are visible.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest
import torch
from conftest import HH_SAMPLE, make_tiny_model, read_jsonl_gz
from oracle import exact_logps

from stages.core.config.options import TrainConfig
from stages.core.runtime.models import enable_activation_checkpointing
from stages.core.scoring.logprobs import scored_logps
from stages.core.scoring.packing import pack_rows, pair_rows
from stages.core.scoring.scorer import ReferenceScorer
from stages.core.scoring.truncation import Truncation
from stages.core.training.policy_pass import forward, held_attention, pass_context

pytestmark = pytest.mark.gpu
HIDDEN = 64  # heads of 16 dimensions: compiled FlexAttention's least on CUDA (the CPU tests' 8 is too few)
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")


def _pairs(tokenizer, n=6, seed=3):
    g = torch.Generator().manual_seed(seed)
    r = lambda lo, hi: torch.randint(0, len(tokenizer), (int(torch.randint(lo, hi, (1,), generator=g)),),  # noqa: E731
                                     generator=g).tolist()
    return [(r(2, 40), r(1, 30), r(1, 30)) for _ in range(n)]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-3), (torch.bfloat16, 0.5)])
def test_packed_scoring_on_cuda_matches_cpu_oracle(tokenizer, dtype, tol):
    cpu = make_tiny_model(tokenizer, seed=2, hidden=HIDDEN)
    gpu = make_tiny_model(tokenizer, seed=2, hidden=HIDDEN).to("cuda", dtype)
    pairs = _pairs(tokenizer)
    rows = [row for j, (p, c, rj) in enumerate(pairs) for row in pair_rows(j, p, c, rj, Truncation(None))]
    inputs, r, c, labels, seq_ids = pack_rows(rows, tokenizer.pad_token_id, dtype, "cuda")
    with torch.inference_mode():
        got = scored_logps(gpu, inputs, r, c, labels, seq_ids, 2 * len(pairs)).cpu()
    assert got.dtype == torch.float64
    for j, (p, ch, rj) in enumerate(pairs):
        assert abs(float(got[2 * j]) - exact_logps(cpu, p + ch, len(p))) < tol
        assert abs(float(got[2 * j + 1]) - exact_logps(cpu, p + rj, len(p))) < tol


def test_training_forward_backward_bf16_autocast_on_cuda(tokenizer):
    model = make_tiny_model(tokenizer, seed=4, hidden=HIDDEN).to("cuda").train()
    enable_activation_checkpointing(model)
    pairs = [{"prompt_ids": p, "chosen_ids": c, "rejected_ids": r} for p, c, r in _pairs(tokenizer, 4, 9)]
    ctx = pass_context(TrainConfig(dtype="bfloat16"), SimpleNamespace(kind="paired", truncation=Truncation(None)),
                       tokenizer.pad_token_id, "cuda")
    with held_attention(model, ctx, True):  # auto: flex on CUDA; backward's recompute must reach it too
        chosen, rejected, _ = forward(model, pairs, ctx)
        (chosen - rejected).sigmoid().log().sum().backward()
    assert torch.isfinite(chosen).all() and torch.isfinite(rejected).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


@pytest.fixture(scope="module")
def deep_model_dir(tmp_path_factory, tokenizer) -> str:
    """A tiny Llama with 128 layers: enough that accelerate's "balanced" map puts part of it (and the
    LM head) on the second GPU, where the 2-layer model would sit on the first one whole."""
    path = tmp_path_factory.mktemp("deep-model")
    make_tiny_model(tokenizer, seed=5, layers=128, hidden=HIDDEN).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@two_gpus
@pytest.mark.parametrize("pack", [True, False])
def test_a_scorer_spread_over_two_gpus_matches_one_gpu(deep_model_dir, tokenizer, pack):
    one = ReferenceScorer(deep_model_dir, "float32", Truncation(None), pack_prompts=pack)
    two = ReferenceScorer(deep_model_dir, "float32", Truncation(None), pack_prompts=pack, gpus=2)
    assert {str(d) for d in two.model.hf_device_map.values()} == {"0", "1"}
    assert two.model.hf_device_map["lm_head"] == 1 and two.input_device == "cuda:0"
    pairs = _pairs(tokenizer, n=8, seed=11)
    if pack:
        rows = [row for j, (p, c, rj) in enumerate(pairs) for row in pair_rows(j, p, c, rj, Truncation(None))]
        got, want = two.score_packed(rows, 2 * len(pairs)), one.score_packed(rows, 2 * len(pairs))
    else:
        seqs = [(p + a, len(p)) for p, c, rj in pairs for a in (c, rj)]
        got, want = two.score_sequences(seqs), one.score_sequences(seqs)
    assert got == pytest.approx(want, abs=1e-4)


@two_gpus
def test_precompute_with_two_gpus_per_worker_matches_one(tmp_path, deep_model_dir, ray_session):
    from stages import precompute
    from stages.core.config.options import PrecomputeConfig

    rows = [r for r in read_jsonl_gz(HH_SAMPLE, 60) if r["chosen"] != r["rejected"] and len(r["chosen"]) < 700][:12]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    logps = {}
    for k in (1, 2):
        out = tmp_path / f"out-{k}"
        cfg = PrecomputeConfig(data=str(tmp_path / "in.jsonl"), model=deep_model_dir, output=str(out), format="hh",
                               rows_per_shard=6, max_length=256, gpus_per_worker=k, progress=False)
        manifest = precompute.run(cfg)
        assert manifest["rows_written"] == 12
        table = pq.read_table(out / "shards", columns=["pair_id", "ref_chosen_logps", "ref_rejected_logps"])
        logps[k] = {r["pair_id"]: (r["ref_chosen_logps"], r["ref_rejected_logps"]) for r in table.to_pylist()}
    assert logps[1].keys() == logps[2].keys()
    for pid, (chosen, rejected) in logps[1].items():
        assert logps[2][pid] == pytest.approx((chosen, rejected), abs=1e-4)


@two_gpus
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_gpu_workers_follow_one(refs, tmp_path, strategy):
    """NCCL: Ray Train workers on two GPUs (bf16: FSDP2 mixed precision or autocast) follow one GPU."""
    from stages import train
    from stages.core.training.metrics import read

    kw = dict(refs=str(refs), batch_size=4, micro_batch_size=2, learning_rate=1e-3, max_steps=3, warmup_ratio=0.0,
              shuffle_buffer=6, progress=False, seed=3, dtype="bfloat16")
    train.run(TrainConfig(output=str(tmp_path / "one"), **kw))
    train.run(TrainConfig(output=str(tmp_path / "two"), num_workers=2, strategy=strategy, **kw))
    for a, b in zip(read(str(tmp_path / "one" / "metrics.jsonl")), read(str(tmp_path / "two" / "metrics.jsonl"))):
        assert b["loss"] == pytest.approx(a["loss"], abs=5e-3)


@pytest.mark.parametrize("path,dtype,tol", [("flex", "float32", 1e-3), ("varlen", "float32", 1e-3),
                                            ("flex", "bfloat16", 0.5), ("varlen", "bfloat16", 0.5)])
def test_flat_paths_on_cuda_equal_dense_with_gradients(tokenizer, path, dtype, tol, monkeypatch):
    """The flat paths on CUDA (flex compiled; varlen through a flash kernel under bf16 autocast, its reference
    kernel in float32): the policy's log-probs and gradients, with activation checkpointing and backward
    outside `forward` as in training (`held_attention`), equal the dense path's."""
    from stages.core.scoring import attention, varlen
    from stages.core.training.losses import LossParams
    from stages.core.training.policy_pass import PassContext

    pairs = [{"prompt_ids": p, "chosen_ids": c, "rejected_ids": r} for p, c, r in _pairs(tokenizer, 5, 11)]
    logps, grads = {}, {}
    kernels = []
    real_flash = varlen._flash
    monkeypatch.setattr(varlen, "_flash", lambda *a: kernels.append(a[-1]) or real_flash(*a))
    for name in ("dense", path):
        model = make_tiny_model(tokenizer, seed=6, hidden=HIDDEN).to("cuda").train()
        enable_activation_checkpointing(model)
        ctx = PassContext(5, Truncation(None), tokenizer.pad_token_id, "cuda", dtype, (("sigmoid", 1.0),),
                          LossParams(0.1, 0.0, 0.05, 0.5), attention=name)
        with held_attention(model, ctx, True):
            chosen, rejected, _ = forward(model, pairs, ctx)
            (chosen.sum() - 0.5 * rejected.sum()).backward()
        logps[name] = torch.cat([chosen, rejected]).detach().cpu()
        grads[name] = torch.cat([p.grad.detach().flatten().float().cpu() for p in model.parameters()
                                 if p.grad is not None])
    assert torch.allclose(logps["dense"], logps[path], atol=tol, rtol=0)
    assert torch.nn.functional.cosine_similarity(grads["dense"], grads[path], dim=0) > 0.999
    if dtype == "float32":
        assert torch.allclose(grads["dense"], grads[path], atol=1e-3, rtol=1e-3)
    assert attention.resolve("auto", "cuda", model) == "flex"
    # varlen under bf16 autocast runs a flash kernel (its inputs cast as autocast would), float32 the reference
    assert bool(kernels) == (path == "varlen" and dtype == "bfloat16" and varlen.fast_kernel_available())


def test_sums_of_cpu_tensors_over_nccl():
    """Ray Train's GPU process group is NCCL alone, which reduces CUDA tensors only: the loop's CPU sums
    (metrics, stop flags) go through the GPU and come back."""
    import socket

    import torch.distributed as dist

    from stages.core.training.distributed import Dist

    if not dist.is_nccl_available():
        pytest.skip("no NCCL in this torch")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        sums = torch.tensor([1.5, -2.0], dtype=torch.float64)
        assert Dist().sum_(sums) is sums and sums.tolist() == [1.5, -2.0] and sums.device.type == "cpu"
        assert Dist().any_(True) and not Dist().any_(False)
    finally:
        dist.destroy_process_group()


def test_varlen_flash_kernel_aligns_short_queries_at_the_bottom_right():
    """The flash varlen kernel on a row whose second answer sees only the prefix (fewer queries than keys):
    bf16 flash output equals the float32 reference kernel's on the same inputs."""
    from stages.core.scoring import varlen

    if not varlen.fast_kernel_available():
        pytest.skip("no flash varlen kernel in this torch")
    rows = pair_rows(0, list(range(1, 300)), list(range(300, 420)), list(range(420, 500)), Truncation(None)) + \
        pair_rows(1, list(range(1, 40)), list(range(40, 90)), [], Truncation(None))
    inputs, *_ = varlen.pack_varlen(rows, 0, "cuda")
    t = inputs["input_ids"].size(1)
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, h, t, 64, device="cuda") for h in (8, 2, 2))
    docs = {varlen.KWARG: inputs[varlen.KWARG]}
    assert varlen.kernel("cuda", torch.bfloat16) in ("torch", "flash_attn")
    fast, _ = varlen.attention_forward(None, *(x.bfloat16() for x in (q, k, v)), None, scaling=0.125, **docs)
    ref, _ = varlen.attention_forward(None, q, k, v, None, scaling=0.125, **docs)
    assert (fast.float() - ref).abs().max() < 3e-2
