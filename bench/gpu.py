#!/usr/bin/env python
"""The scorer and the trainer on one GPU, beside the TRL-shaped pass, in one run: a JSON file and a markdown table.

    python bench/gpu.py [--shapes 1b,8b] [--pairs 512] [--out bench/results/gpu]   # one CUDA device
    .venv/bin/python bench/gpu.py --quick --out /tmp/gpu-quick                    # tiny shapes on CPU (a test)

Needs torch, transformers and pyarrow only (no Ray, datasets or s3fs): it calls the library's scorer
and policy pass directly, on pairs read as token ids from bench/data/gpu (bench/gpu_data.py made them
with SmolLM2's tokenizer: HH-RLHF short pairs, Orca and ShareGPT long ones). Models are random
weights with real shapes (Llama-3.2-1B, Llama-3.1-8B; speed does not depend on the values).

- scoring: the project's ReferenceScorer at its defaults (attention auto, and dense beside it) vs the
  TRL-shaped pass (8 pairs a batch in dataset order, chosen and rejected concatenated and right-padded,
  logits at every position, float32 log-softmax), pairs/s, tokens/s, estimated MFU (2 x params x
  tokens, the prompt counted once), peak memory;
- training: steps with precomputed references vs with a bf16 reference beside the policy (its forward on
  every micro-batch), alternated, after warm-up steps that are not counted;
- long pairs: random ids, the prompt half the pair, 1k to 16k tokens: the scorer's tokens/s and memory;
- profile (--profile-steps, default 3): torch.profiler over warm steps with precomputed references; each kind
  of op's share of the device's kernel time (CPU: of the ops' own time), and the step's wall time the ops
  leave unexplained (Python, packing, waiting), into profile.md and the JSON.
MFU uses the H200's dense bf16 peak (989 TFLOP/s) unless --peak-tflops says otherwise; on CPU none.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import random
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DATA = ROOT / "bench" / "data" / "gpu"

SHAPES = {  # LlamaConfig fields; vocabulary 128,256 as the Llama 3 family
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=49152, tie_word_embeddings=False),
}


def load_pairs(name: str, n: int, max_length: int) -> list[dict]:
    """The first n pairs of the set that precompute keeps at max_length, cut as it cuts them."""
    from stages.core.inputs.formats import RowRejected
    from stages.core.scoring.truncation import Truncation

    cut, pairs = Truncation(max_length), []
    with gzip.open(DATA / f"{name}.jsonl.gz", "rt") as fh:
        for line in fh:
            try:
                pairs.append(cut.cut(json.loads(line)))
            except RowRejected:  # a prompt with no room left: precompute rejects it too
                continue
            if len(pairs) == n:
                break
    return pairs


def random_pairs(n: int, length: int, vocab: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    ids = lambda k: [rng.randrange(100, vocab) for _ in range(k)]  # noqa: E731
    return [{"prompt_ids": ids(length // 2), "chosen_ids": ids(length // 4), "rejected_ids": ids(length // 4)}
            for _ in range(n)]


def pair_tokens(pairs: list[dict]) -> int:
    return sum(len(p["prompt_ids"]) + len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in pairs)


def build(shape: str, device: str, dtype):
    """(model folder with config + tokenizer, model) with random weights, made on the device in `dtype`."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = tempfile.mkdtemp(prefix=f"bench-{shape}-")
    config = LlamaConfig(max_position_embeddings=32768, **SHAPES[shape])
    config.save_pretrained(folder)
    AutoTokenizer.from_pretrained(DATA / "tokenizer").save_pretrained(folder)
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            torch.manual_seed(0)
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(before)
    return folder, model.eval()


class Clock:
    def __init__(self, device: str):
        self.device = device

    def sync(self):
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()

    def reset_peak(self):
        import torch

        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()

    def peak_gb(self) -> float | None:
        import torch

        return torch.cuda.max_memory_allocated() / 1e9 if self.device == "cuda" else None


def as_table(pairs: list[dict]):
    import pyarrow as pa

    from stages.core.scoring.scorer import TOKENIZED_SCHEMA

    n = len(pairs)
    cols = {name: [None] * n for name in TOKENIZED_SCHEMA.names}
    cols.update(pair_id=[str(i) for i in range(n)], row_key=[str(i) for i in range(n)], source_index=list(range(n)),
                shard=[0] * n, **{k: [p[k] for p in pairs] for k in ("prompt_ids", "chosen_ids", "rejected_ids")})
    return pa.Table.from_pydict(cols, schema=TOKENIZED_SCHEMA)


@contextlib.contextmanager
def recorded(rows: list[dict], section: str, shape: str, data: str, what: str):
    """One measurement: an error in it becomes a row of the table ("FAILED" and the error's first line, the
    traceback on stderr) and the bench goes on. A GPU run is scarce: one failed path must not cost the rest."""
    try:
        yield
    except Exception as e:  # noqa: BLE001
        import torch

        traceback.print_exc()
        first = (str(e).strip().splitlines() or [""])[0][:300]
        rows.append(dict(section=section, shape=shape, data=data, what=f"{what}: FAILED {type(e).__name__}: {first}"))
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def run_scorer(scorer, pairs: list[dict], per_call: int, clock: Clock) -> float:
    """Seconds for the scorer over `pairs` in calls of `per_call` pairs, as the precompute's actors call it."""
    clock.sync()
    start = time.perf_counter()
    for i in range(0, len(pairs), per_call):
        scorer(as_table(pairs[i:i + per_call]))
    clock.sync()
    return time.perf_counter() - start


def trl_shaped(model, pairs: list[dict], pad_id: int, device: str, clock: Clock, batch: int = 8) -> float:
    """TRL's precompute pass, in shape: batches of 8 pairs in order, chosen and rejected concatenated and
    right-padded, logits at every position, float32 log-softmax, completion tokens summed."""
    import torch

    clock.sync()
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(pairs), batch):
            chunk = pairs[i:i + batch]
            seqs = [p["prompt_ids"] + p[k] for k in ("chosen_ids", "rejected_ids") for p in chunk]
            starts = [len(p["prompt_ids"]) for p in chunk] * 2
            width = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            comp = torch.zeros_like(ids)
            for j, (s, st) in enumerate(zip(seqs, starts)):
                ids[j, :len(s)], mask[j, :len(s)], comp[j, st:len(s)] = torch.tensor(s), 1, 1
            ids, mask, comp = ids.to(device), mask.to(device), comp.to(device)
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            logps = logits.log_softmax(-1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
            (logps * comp[:, 1:]).sum(-1).tolist()
    clock.sync()
    return time.perf_counter() - start


def scoring(a, shape: str, device: str, clock: Clock, rows: list[dict]) -> None:
    import torch

    from stages.core.scoring.scorer import ReferenceScorer
    from stages.core.scoring.truncation import Truncation

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    folder, model = build(shape, device, dtype)
    params = sum(p.numel() for p in model.parameters())
    pad = 0
    for name in a.sets:
        pairs = load_pairs(name, a.pairs, a.max_length)
        tokens = pair_tokens(pairs)
        # The other paths on the first set only (the bench must fit its 8 minutes); on CPU (--quick) unfused
        # flex is slow, and only the paths are checked.
        extra = (["varlen"] if device == "cuda" else ["flex", "varlen"]) if name == a.sets[0] else []
        for attention in ["auto"] + (["dense"] if device == "cuda" else []) + extra:
            with recorded(rows, "scoring", shape, name, f"project, attention {attention}"):
                scorer = ReferenceScorer(folder, "bfloat16" if device == "cuda" else "float32",
                                         Truncation(a.max_length), model=model, device=device, attention=attention)
                run_scorer(scorer, pairs[:a.per_call], a.per_call, clock)  # warm-up (and compilation), not counted
                clock.reset_peak()
                s = run_scorer(scorer, pairs, a.per_call, clock)
                rows.append(dict(section="scoring", shape=shape, data=name, what=f"project, attention {attention} "
                                 f"({scorer.attention}), {a.per_call} pairs a call, {scorer.tokens_per_forward} "
                                 "tokens a forward", pairs=len(pairs), seconds=s, pairs_per_s=len(pairs) / s,
                                 tokens_per_s=tokens / s, mfu=mfu(2 * params * tokens / s, a),
                                 peak_gb=clock.peak_gb()))
        what = "TRL-shaped (8 pairs a batch, padded, float32 log-softmax)"
        with recorded(rows, "scoring", shape, name, what):
            trl_shaped(model, pairs[:8], pad, device, clock)
            clock.reset_peak()
            s = trl_shaped(model, pairs, pad, device, clock)
            rows.append(dict(section="scoring", shape=shape, data=name, what=what, pairs=len(pairs), seconds=s,
                             pairs_per_s=len(pairs) / s, tokens_per_s=tokens / s,
                             mfu=mfu(2 * params * tokens / s, a), peak_gb=clock.peak_gb()))
    if shape == a.long_shape:
        long_pairs(a, model, folder, params, device, clock, rows)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()


def long_pairs(a, model, folder, params, device, clock, rows) -> None:
    from stages.core.scoring.scorer import ReferenceScorer
    from stages.core.scoring.truncation import Truncation

    for length in a.long_lengths:
        data = f"random ids, {length} tokens a pair"
        with recorded(rows, "long pairs", a.long_shape, data, "project, attention auto"):
            pairs = random_pairs(max(2, a.long_tokens // length), length, model.config.vocab_size)
            tokens = pair_tokens(pairs)
            scorer = ReferenceScorer(folder, "bfloat16" if device == "cuda" else "float32", Truncation(None),
                                     model=model, device=device, attention="auto")
            run_scorer(scorer, pairs[:1], 1, clock)
            clock.reset_peak()
            s = run_scorer(scorer, pairs, a.per_call, clock)
            rows.append(dict(section="long pairs", shape=a.long_shape, data=data,
                             what=f"project, attention auto ({scorer.attention})", pairs=len(pairs), seconds=s,
                             pairs_per_s=len(pairs) / s, tokens_per_s=tokens / s,
                             mfu=mfu(2 * params * tokens / s, a), peak_gb=clock.peak_gb()))


def training(a, device: str, clock: Clock, rows: list[dict]) -> None:
    """Steps with precomputed references and with a bf16 reference beside the policy, alternated."""
    import torch

    from stages.core.runtime.models import enable_activation_checkpointing
    from stages.core.scoring.truncation import Truncation
    from stages.core.training.losses import LossParams
    from stages.core.training.policy_pass import PassContext, attention_path, forward, held_attention, micro_batches

    shape = a.train_shape
    _, policy = build(shape, device, torch.float32)
    policy.train()
    enable_activation_checkpointing(policy)
    _, reference = build(shape, device, torch.bfloat16 if device == "cuda" else torch.float32)
    reference.requires_grad_(False)
    params = sum(p.numel() for p in policy.parameters())
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-6, fused=device == "cuda")
    ctx = PassContext(a.micro_batch, Truncation(a.max_length), 0, device, "bfloat16" if device == "cuda" else "float32",
                      (("sigmoid", 1.0),), LossParams(0.1, 0.0, 0.05, 0.5),
                      attention=a.train_attention, micro_batch_tokens=a.micro_batch_tokens)
    path = attention_path(policy, ctx, True)
    pairs = load_pairs(a.train_set, a.step_pairs * (a.steps + a.warmup + a.profile_steps) * 2, a.max_length)
    batches = [pairs[i:i + a.step_pairs] for i in range(0, len(pairs), a.step_pairs)]

    def step(batch: list[dict], beside: bool) -> None:
        for mb in micro_batches(batch, ctx):  # a.micro_batch pairs each, or by --micro-batch-tokens
            if beside:
                with torch.no_grad():
                    ref_c, ref_r, _ = forward(reference, mb, ctx)
            else:  # precomputed: numbers read from the shards (their values do not change the speed)
                ref_c = ref_r = torch.zeros(len(mb), dtype=torch.float64, device=device)
            with held_attention(policy, ctx, True):  # the checkpointing recompute in backward: the same attention
                chosen, rejected, _ = forward(policy, mb, ctx)
                margin = 0.1 * ((chosen - ref_c) - (rejected - ref_r))
                (-torch.nn.functional.logsigmoid(margin).sum() / len(batch)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times = {False: [], True: []}
    tokens = {False: 0, True: 0}  # of the measured steps: batches differ in length
    peaks = {False: None, True: None}
    for k, batch in enumerate(batches[:2 * (a.steps + a.warmup)]):
        beside = k % 2 == 1  # alternated, so drift in clocks or memory hits both alike
        clock.reset_peak()
        clock.sync()
        start = time.perf_counter()
        step(batch, beside)
        clock.sync()
        if k >= 2 * a.warmup:
            times[beside].append(time.perf_counter() - start)
            tokens[beside] += pair_tokens(batch)
            peak = clock.peak_gb()
            peaks[beside] = None if peak is None else max(peak, peaks[beside] or 0.0)  # the steps' highest
    for beside, label in ((False, "precomputed references"),
                          (True, "reference beside the policy (bf16, every micro-batch)")):
        s = sum(times[beside]) / len(times[beside])
        per_s = tokens[beside] / sum(times[beside])
        rows.append(dict(section="training", shape=shape, data=a.train_set,
                         what=f"{label}; attention {a.train_attention} ({path})", pairs=a.step_pairs,
                         seconds=s, s_per_step=s, tokens_per_s=per_s, mfu=mfu(6 * params * per_s, a),
                         peak_gb=peaks[beside], steps=len(times[beside])))
    if a.profile_steps:
        with recorded(rows, "profile", shape, a.train_set, "torch.profiler"):
            profile(a, device, clock, batches[2 * (a.steps + a.warmup):][:a.profile_steps],
                    lambda b: step(b, False), rows)


# Kinds of op for the profile, by the op's name (its own time: a linear's work is in its addmm).
OP_KINDS = (("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::_scaled_mm", "aten::baddbmm")),
            ("attention", ("attention", "flex")),
            ("copy and cast", ("aten::copy_", "aten::_to_copy", "aten::to", "aten::clone", "aten::contiguous")),
            ("elementwise mul", ("aten::mul",)),
            ("log-softmax", ("logsumexp", "log_softmax", "aten::exp", "aten::sub", "aten::gather")),
            ("optimizer", ("adam", "Optimizer.step", "aten::_foreach")))


def kind_of(name: str) -> str:
    low = name.lower()
    return next((k for k, keys in OP_KINDS if any(x.lower() in low for x in keys)), "other")


UNLAUNCHED = "(kernels no op launched: compiled graphs, ...)"


def op_times(events, device: str) -> dict[str, float]:
    """Each op's own time in microseconds, adding up to the whole without counting anything twice. CPU: the ops'
    own CPU time. CUDA: the whole is the kernels' time (the CUDA rows, not user annotations, as torch's own
    table counts it); each CPU op gets the time of the kernels it launched itself (its self device time), and
    what no op launched (compiled graphs' kernels, under annotations) is a row of its own."""
    if device != "cuda":
        return {e.key: float(e.self_cpu_time_total or 0.0) for e in events}
    on_cpu = lambda e: str(e.device_type).rsplit(".", 1)[-1] == "CPU"  # noqa: E731
    kernels = sum(float(e.self_device_time_total or 0.0) for e in events
                  if not on_cpu(e) and not e.is_user_annotation)
    times = {e.key: float(e.self_device_time_total) for e in events
             if on_cpu(e) and not e.is_user_annotation and e.self_device_time_total}
    rest = kernels - sum(times.values())
    if rest > 0:
        times[UNLAUNCHED] = rest
    return times


def profile(a, device: str, clock, batches: list[list[dict]], step, rows: list[dict]) -> None:
    """torch.profiler over warm training steps: each kind of op's share of the device's kernel time (on CPU, of
    the ops' own CPU time), the wall time of the steps and the share of it that no op's time covers."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    clock.sync()
    start = time.perf_counter()
    with torch_profile(activities=activities) as prof:
        for batch in batches:
            step(batch)
        clock.sync()
    wall = time.perf_counter() - start
    events = prof.key_averages()
    times = op_times(events, device)  # microseconds
    total = sum(times.values()) or 1e-9
    kinds: dict[str, float] = {}
    for name, t in times.items():
        kind = kind_of(name)
        kinds[kind] = kinds.get(kind, 0.0) + t
    cpu = sum(float(e.self_cpu_time_total) for e in events)
    what = "GPU kernel time" if device == "cuda" else "ops' own CPU time"
    lines = [f"profile: {len(batches)} warm steps with precomputed references, {wall:.2f} s wall; {what} "
             f"{total / 1e6:.2f} s, CPU time in ops {cpu / 1e6:.2f} s", "", f"| kind | share of {what} | s |",
             "|---|---|---|"]
    for k, t in sorted(kinds.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {k} | {100 * t / total:.1f}% | {t / 1e6:.3f} |")
        rows.append(dict(section="profile", shape=a.train_shape, data=a.train_set, what=k, share=t / total,
                         seconds=t / 1e6, steps=len(batches)))
    top = sorted(times.items(), key=lambda kv: -kv[1])[:15]
    lines += ["", f"| op | share of {what} |", "|---|---|"] + [f"| {n} | {100 * t / total:.1f}% |" for n, t in top]
    a.profile_text = "\n".join(lines) + "\n"


def mfu(flops_per_s: float, a) -> float | None:
    return flops_per_s / (a.peak_tflops * 1e12) if a.peak_tflops else None


def markdown(rows: list[dict], header: str) -> str:
    out = [header, "", "| section | shape | data | what | pairs/s | tokens/s | s/step | MFU | peak GB |",
           "|---|---|---|---|---|---|---|---|---|"]
    f = lambda v, spec: "" if v is None else format(v, spec)  # noqa: E731
    for r in rows:
        out.append(f"| {r['section']} | {r['shape']} | {r['data']} | {r['what']} | {f(r.get('pairs_per_s'), '.1f')} "
                   f"| {f(r.get('tokens_per_s'), ',.0f')} | {f(r.get('s_per_step'), '.3f')} "
                   f"| {f(r.get('mfu') and 100 * r['mfu'], '.1f')} | {f(r.get('peak_gb'), '.1f')} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> dict:
    import torch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes, few pairs, CPU: a smoke run (the tests')")
    p.add_argument("--shapes", default="1b,8b")
    p.add_argument("--sets", default="hh,orca,sharegpt")
    p.add_argument("--pairs", type=int, default=256, help="pairs per data set")
    p.add_argument("--per-call", type=int, default=256, help="pairs per scorer call")
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--long-lengths", default="1024,4096,8192,16384")
    p.add_argument("--long-tokens", type=int, default=262144, help="tokens scored per long-pair length")
    p.add_argument("--train-set", default="orca")
    p.add_argument("--steps", type=int, default=5, help="measured steps per mode")
    p.add_argument("--warmup", type=int, default=2, help="steps per mode not measured")
    p.add_argument("--step-pairs", type=int, default=16)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--micro-batch-tokens", type=int, default=None, help="training micro-batches by token budget")
    p.add_argument("--train-attention", default="auto", help="training's attention: auto, dense, flex or varlen")
    p.add_argument("--profile-steps", type=int, default=3, help="warm steps under torch.profiler (0: none)")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak (default: 989 on CUDA)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu"))
    a = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() and not a.quick else "cpu"
    if a.quick:
        a.shapes, a.sets, a.pairs, a.per_call, a.max_length = "tiny", "hh,orca", 4, 4, 256
        a.long_lengths, a.long_tokens, a.steps, a.warmup, a.step_pairs, a.micro_batch = "512", 512, 1, 1, 2, 2
        a.profile_steps = min(a.profile_steps, 1)
    elif device != "cuda":
        p.error("no CUDA device: run with --quick for the CPU smoke run")
    if a.peak_tflops is None and device == "cuda":
        a.peak_tflops = 989.0
    shapes = a.shapes.split(",")
    a.sets, a.long_lengths = a.sets.split(","), [int(x) for x in a.long_lengths.split(",")]
    a.long_shape = a.train_shape = shapes[0]
    clock = Clock(device)
    rows: list[dict] = []
    started = time.perf_counter()
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    result = {"device": name, "torch": torch.__version__, "args": {k: v for k, v in vars(a).items()}, "rows": rows}
    # The first shape's scoring and training first, then the other shapes: a run cut short (a lent machine's
    # minutes) keeps the first shape whole.
    for k, shape in enumerate(shapes):
        with recorded(rows, "scoring", shape, "", "set-up"):
            scoring(a, shape, device, clock, rows)
        write(a, result, started, final=False)  # what is measured so far survives a run cut short
        if k == 0:
            with recorded(rows, "training", a.train_shape, a.train_set, "set-up"):
                training(a, device, clock, rows)
            write(a, result, started, final=False)
    write(a, result, started, final=True)
    return result


def write(a, result: dict, started: float, final: bool) -> None:
    """gpu.json, gpu.md (and profile.md) under --out; printed when `final`."""
    import torch

    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    header = (f"bench/gpu.py on {result['device']}: torch {torch.__version__}, {when}, "
              f"{time.perf_counter() - started:.0f} s" + ("" if final else " (so far: the run goes on)"))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.json").write_text(json.dumps(result, indent=1, default=str))
    table = markdown([r for r in result["rows"] if r["section"] != "profile"], header)
    (out / "gpu.md").write_text(table)
    if getattr(a, "profile_text", None):
        (out / "profile.md").write_text(a.profile_text)
    if final:
        print(table)
        print(getattr(a, "profile_text", None) or "")


if __name__ == "__main__":
    main()
