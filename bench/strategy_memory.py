#!/usr/bin/env python
"""Model-state memory per worker: ddp vs fsdp (FSDP2) vs LoRA, on a ~100M-parameter Llama, on CPU.

    .venv/bin/python bench/strategy_memory.py [--layers 20] [--steps 3] [--seqs 2] [--tokens 128]

Every case starts its workers afresh with torch.multiprocessing (spawn; gloo on 127.0.0.1, a free
port). Each worker seeds, builds the same randomly initialised Llama (SmolLM2-135M's shapes with
fewer layers), adds LoRA adapters when the case asks (r 16 on every linear layer but the LM head,
through `stages.core.training.parallel.add_lora`), wraps it with `stages.core.training.parallel.wrap` as the trainer
does, and runs a few AdamW (fused) steps on a fixed random batch of its own, the loss being the mean
token cross-entropy computed through the wrapper. Then it measures, in its own process:

  * parameters, gradients and optimizer state: the sum of numel * element size of the tensors this
    worker holds (a DTensor's local shard under FSDP2), counted once each (the tied embedding is
    one parameter);
  * peak RSS: the kernel-recorded maximum resident set of the worker process (ru_maxrss).

Model state = parameters + gradients + optimizer state. The issue's target is fsdp on 2 workers at
most 0.6x of ddp's per-worker model state on 2 workers (a perfect 2-way shard gives 0.5x).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MIB = 2**20
TARGET = 0.6
# (label, strategy, workers, lora)
CASES = [("ddp", "ddp", 1, False), ("ddp", "ddp", 2, False), ("fsdp", "fsdp", 2, False),
         ("lora + ddp", "ddp", 2, True), ("lora + fsdp", "fsdp", 2, True)]
LORA_R, LORA_ALPHA = 16, 32.0


def llama_config(layers: int):
    """SmolLM2-135M's shapes (hidden 576, MLP 1536, 9 heads, 3 KV heads, vocab 49,152, tied
    embeddings), `layers` decoder layers."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                       num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                       tie_word_embeddings=True, rms_norm_eps=1e-5)


def _bytes(tensors) -> int:
    total = 0
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        total += t.numel() * t.element_size()
    return total


def _worker(rank: int, world: int, port: int, job: dict, out_dir: str) -> None:
    import warnings

    import torch
    import torch.distributed as dist
    from transformers import LlamaForCausalLM

    from stages.core.training import parallel

    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)  # peft's
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    started = time.perf_counter()

    torch.manual_seed(0)  # the same initial model on every worker
    model = LlamaForCausalLM(llama_config(job["layers"]))
    if job["lora"]:
        model, _ = parallel.add_lora(model, r=LORA_R, alpha=LORA_ALPHA, dropout=0.0, target_modules="all-linear")
    n_params = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    wrapped = parallel.wrap(model, job["strategy"], world, "float32")
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, fused=True)

    gen = torch.Generator().manual_seed(1000 + rank)  # each worker its own fixed batch
    ids = torch.randint(0, model.config.vocab_size, (job["seqs"], job["tokens"]), generator=gen)
    losses = []
    for _ in range(job["steps"]):
        optimizer.zero_grad(set_to_none=True)
        loss = wrapped(lambda m, x: m(input_ids=x, labels=x).loss, ids)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))

    params = list(model.parameters())  # deduplicated: the tied embedding once
    state = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    result = {"rank": rank, "params_total": n_params, "trainable_total": n_trainable,
              "params_bytes": _bytes(params), "grads_bytes": _bytes(p.grad for p in params if p.grad is not None),
              "optim_bytes": _bytes(state), "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
              "losses": losses, "seconds": time.perf_counter() - started}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
        json.dump(result, fh)
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # an FSDP2 process can abort in its exit handlers (see FACTS); the result is written


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_case(strategy: str, world: int, lora: bool, a: argparse.Namespace) -> list[dict]:
    import torch.multiprocessing as mp

    job = {"strategy": strategy, "lora": lora, "layers": a.layers, "steps": a.steps, "seqs": a.seqs,
           "tokens": a.tokens}
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_worker, args=(world, _free_port(), job, out_dir), nprocs=world, start_method="spawn")
        results = [json.loads((Path(out_dir) / f"rank{r}.json").read_text()) for r in range(world)]
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=20, help="decoder layers (20: ~99M parameters)")
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps per worker")
    ap.add_argument("--seqs", type=int, default=2, help="sequences per worker per step")
    ap.add_argument("--tokens", type=int, default=128, help="tokens per sequence")
    a = ap.parse_args()

    import torch
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        n_params = sum(p.numel() for p in LlamaForCausalLM(llama_config(a.layers)).parameters())
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "stages"], cwd=ROOT, capture_output=True,
                               text=True).stdout.strip()
        commit += " (stages/ modified)" if dirty else " (stages/ clean)"
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    print(f"bench/strategy_memory.py: {stamp}; git {commit}; {platform.system()} {platform.machine()}, "
          f"CPU, {os.cpu_count()} cores; torch {torch.__version__}, gloo")
    print(f"Llama, randomly initialised: {a.layers} layers, hidden 576, MLP 1536, 9 heads / 3 KV heads, vocab "
          f"49,152, tied embeddings: {n_params:,} parameters, float32. Each worker: {a.steps} AdamW (fused) "
          f"steps on its own fixed batch of {a.seqs} x {a.tokens} tokens. LoRA: r {LORA_R}, alpha {LORA_ALPHA:g}, "
          "all linear layers but the LM head, base frozen.\n", flush=True)

    started = time.perf_counter()
    rows = []
    for label, strategy, world, lora in CASES:
        t = time.perf_counter()
        res = run_case(strategy, world, lora, a)
        print(f"  {label}, {world} worker(s): {time.perf_counter() - t:.0f} s; losses rank 0 "
              f"{[round(x, 4) for x in res[0]['losses']]}", file=sys.stderr, flush=True)
        rows.append((label, world, res))

    def per_worker(res: list[dict], key: str) -> float:
        return max(r[key] for r in res)  # the worker holding the most (shards can be uneven)

    def state(res: list[dict]) -> float:
        return max(r["params_bytes"] + r["grads_bytes"] + r["optim_bytes"] for r in res)

    ref = state(next(res for label, world, res in rows if label == "ddp" and world == 2))
    print("| case | workers | trainable params | params MiB / worker | grads MiB / worker | optimizer MiB / worker "
          "| model state MiB / worker | vs ddp 2 | peak RSS MiB / worker | loss step 1 -> last (rank 0) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for label, world, res in rows:
        rss = "/".join(f"{r['peak_rss_kib'] / 1024:.0f}" for r in res)
        losses = res[0]["losses"]
        print(f"| {label} | {world} | {res[0]['trainable_total']:,} | {per_worker(res, 'params_bytes') / MIB:.1f} | "
              f"{per_worker(res, 'grads_bytes') / MIB:.1f} | {per_worker(res, 'optim_bytes') / MIB:.1f} | "
              f"{state(res) / MIB:.1f} | {state(res) / ref:.3f}x | {rss} | {losses[0]:.4f} -> {losses[-1]:.4f} |")
    fsdp = state(next(res for label, world, res in rows if label == "fsdp" and world == 2)) / ref
    print("\nMiB columns: the worker holding the most; peak RSS: each worker (rank 0/rank 1). Model state = "
          "parameters + gradients + AdamW state (exp_avg, exp_avg_sq, step). Not in model state: DDP's gradient "
          "buckets (by default about one more copy of the gradients), FSDP2's gathered layers during forward "
          "and backward, activations, and the Python/torch runtime of each process; those show in peak RSS.")
    print(f"\nTarget (issue 12): fsdp on 2 workers <= {TARGET}x ddp's per-worker model state on 2 workers: "
          f"{fsdp:.3f}x, {'HOLDS' if fsdp <= TARGET else 'DOES NOT HOLD'}.")
    print(f"\nWall time of the whole benchmark: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
