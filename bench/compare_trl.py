#!/usr/bin/env python
"""This project vs trl 1.16.0's DPOTrainer, side by side on one machine, in one run.

    .venv/bin/python bench/compare_trl.py [--pairs 128] [--steps 4] [--dtype float32] [--checkpointing on,off]

Same model (SmolLM2-135M-Instruct), same pairs (the bundled HH-RLHF sample through the chat
template), same dtype, same max_length. Each measurement runs in its own process, TRL and ours
alternating; peak memory is the RSS of the process and its children (CPU) or
torch.cuda.max_memory_allocated (GPU). Training runs with the same gradient-checkpointing setting
on both sides (TRL defaults to on), on the same pairs in the same micro-batches.
Prints a markdown table; ratios are the headline.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from process_memory import peak_rss_mb, watch_process_tree  # noqa: E402  (bench/, beside this script)

# The bundled HH-RLHF sample (`embedded:hh-rlhf-helpful`), named by its file, read with the hh layout.
DATA = str(ROOT / "data" / "hh_rlhf_helpful_base_demo_train.jsonl.gz")


def rows(n: int) -> list[dict]:
    """The first n embedded pairs as TRL rows (our hh adapter's output: the same tokens for both)."""
    from stages.core.inputs.formats import Columns, normalise
    from stages.core.inputs.readers import read_rows

    cfg = Columns()
    out = []
    for _, raw in read_rows(DATA, limit=n):
        out.append({k: v for k, v in normalise(raw, "hh", cfg).items() if k in ("prompt", "chosen", "rejected")})
    return out


def stream_order(refs: str) -> list[int]:
    """Source rows in the order our trainer streams them with a shuffle buffer of 1 (epoch 0, seed 0)."""
    import pyarrow.parquet as pq

    from stages.core.refs import stream

    loaded = stream.load_refs(refs)
    index = {}
    for shard in loaded.manifest["shards"]:
        t = pq.read_table(os.path.join(refs, shard["path"]), columns=["pair_id", "source_index"])
        index.update(zip(t.column("pair_id").to_pylist(), t.column("source_index").to_pylist()))
    return [index[p["pair_id"]] for p in stream.epoch_pairs(loaded, 0, 0, 1)]


def peak_memory_mb() -> float:
    """GPU: torch.cuda.max_memory_allocated. CPU: peak RSS of the process tree (the sampled sum, or
    this process's exact kernel-recorded peak when that is higher: sampling can miss a short peak)."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return peak_rss_mb()


def matmul_peak(dtype: str) -> float:
    """GFLOP/s of a large square matmul: the machine's practical peak for this dtype."""
    import torch

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    n = 8192 if dev == "cuda" else 2048
    a = torch.randn(n, n, dtype=getattr(torch, dtype), device=dev)
    b = torch.randn(n, n, dtype=getattr(torch, dtype), device=dev)
    for _ in range(3):
        a @ b
    reps, best = 10, 0.0
    for _ in range(reps):
        if dev == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if dev == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * n ** 3 / (time.perf_counter() - t) / 1e9)
    return best


def _trl_args(tmp: str, a, **kw):
    from trl import DPOConfig

    return DPOConfig(output_dir=tmp, report_to=[], max_length=a.max_length, use_cpu=not _cuda(), warmup_steps=0,
                     bf16=a.dtype == "bfloat16", per_device_train_batch_size=a.micro, logging_steps=1,
                     gradient_accumulation_steps=a.batch // a.micro, learning_rate=5e-6, save_strategy="no",
                     dataloader_num_workers=0, **kw)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def work(mode: str, a) -> dict:
    """One measurement, in this (fresh) process."""
    import torch
    from datasets import Dataset

    from stages.core.runtime.models import embedded_model_path, load_tokenizer

    model_path = str(embedded_model_path())
    tok = load_tokenizer(model_path)
    data = rows(a.pairs)
    tmp = tempfile.mkdtemp()
    dtype = getattr(torch, a.dtype)
    if mode == "ours_precompute":
        import pyarrow as pa

        from stages import precompute
        from stages.core.config.options import PrecomputeConfig
        from stages.core.scoring.scorer import ReferenceScorer, tokenize_batch
        from stages.core.scoring.truncation import Truncation

        # Compute only, like TRL's number: the scorer class on tokenized pairs, model already loaded.
        recs = [{"pair_id": str(i), "row_key": str(i), "source_index": i, "shard": 0, "row_json": json.dumps(r)}
                for i, r in enumerate(data)]
        truncation = Truncation(a.max_length)  # keep_start, no prompt limit: TRL's defaults
        tokenized = tokenize_batch(pa.Table.from_pylist(recs), model_path, truncation)
        ids = tokenized.to_pylist()
        unique = sum(len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in ids)
        scorer = ReferenceScorer(model_path, a.dtype, truncation, threads=os.cpu_count())
        t = time.perf_counter()
        batch = PrecomputeConfig().batch_size  # the stage's default scorer call
        for i in range(0, tokenized.num_rows, batch):
            scorer(tokenized.slice(i, batch))
        compute = time.perf_counter() - t
        del scorer
        # End to end: the whole stage (Ray start, actor model load, tokenizing, Parquet, manifest).
        t = time.perf_counter()
        m = precompute.run(PrecomputeConfig(data=DATA, format="hh", model=model_path, output=f"{tmp}/refs",
                                            limit=a.pairs, max_length=a.max_length, dtype=a.dtype, progress=False))
        return {"seconds": compute, "end_to_end_seconds": time.perf_counter() - t, "pairs": m["rows_written"],
                "tokens": m["tokens"], "unique_tokens": unique}
    if mode == "trl_precompute":
        from transformers import AutoModelForCausalLM
        from trl import DPOTrainer

        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
        ds = Dataset.from_list(data)
        t = time.perf_counter()
        DPOTrainer(model=model, args=_trl_args(tmp, a, precompute_ref_log_probs=True, precompute_ref_batch_size=16),
                   train_dataset=ds, processing_class=tok)
        with_pre = time.perf_counter() - t
        import copy

        ref = copy.deepcopy(model)  # set-up without the precompute, to subtract (tokenizing, wrapping)
        t = time.perf_counter()
        DPOTrainer(model=model, args=_trl_args(tmp, a, precompute_ref_log_probs=False), train_dataset=ds,
                   processing_class=tok, ref_model=ref)
        return {"seconds": with_pre - (time.perf_counter() - t), "pairs": len(data)}
    if mode == "ours_train":
        from stages import train
        from stages.core.config.options import TrainConfig

        # Shards from the separate precompute process (this process only trains, as in production),
        # read in stored order (shuffle buffer 1): the same micro-batches TRL gets below.
        t = time.perf_counter()
        s = train.run(TrainConfig(refs=a.refs, output=f"{tmp}/run", max_steps=a.steps, batch_size=a.batch,
                                  micro_batch_size=a.micro, dtype=a.dtype, progress=False, warmup_ratio=0.0,
                                  shuffle_buffer=1, gradient_checkpointing=a.gc == "on"))
        return {"seconds_per_step": (time.perf_counter() - t) / s["steps"], "peak_mb": peak_memory_mb()}
    if mode in ("trl_train_ref", "trl_train_precomputed"):
        from torch.utils.data import SequentialSampler
        from transformers import AutoModelForCausalLM
        from trl import DPOTrainer

        class InOrder(DPOTrainer):  # TRL's random sampler would give it other micro-batches than ours
            def _get_train_sampler(self, *args, **kwargs):
                return SequentialSampler(self.train_dataset)

        order = json.loads(Path(a.order).read_text())[:a.steps * a.batch]  # the pairs the steps use
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        pre = mode == "trl_train_precomputed"
        args = _trl_args(tmp, a, max_steps=a.steps, precompute_ref_log_probs=pre, gradient_checkpointing=a.gc == "on")
        trainer = InOrder(model=model, args=args,
                          train_dataset=Dataset.from_list([data[i] for i in order]), processing_class=tok,
                          ref_model=None if pre else AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype))
        out = trainer.train()
        return {"seconds_per_step": out.metrics["train_runtime"] / a.steps, "peak_mb": peak_memory_mb()}
    raise ValueError(mode)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=128, help="the bundled training sample has 128")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8, help="pairs per optimizer step")
    ap.add_argument("--micro", type=int, default=2, help="pairs per forward")
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--checkpointing", default="on,off",
                    help="gradient checkpointing settings to train with, both tools alike (TRL's default is on)")
    ap.add_argument("--parts", default="precompute,train")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--refs", help=argparse.SUPPRESS)
    ap.add_argument("--order", help=argparse.SUPPRESS)
    ap.add_argument("--gc", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        watch_process_tree()
        print("RESULT " + json.dumps(work(a.worker, a)))
        return
    # One precompute for our training runs, and the order its shards stream in, which TRL gets too.
    shared = tempfile.mkdtemp()
    a.refs, a.order = f"{shared}/refs", f"{shared}/order.json"
    runs = []  # (mode, gradient checkpointing), alternating TRL / ours
    if "precompute" in a.parts:
        runs += [("trl_precompute", "off"), ("ours_precompute", "off")]
    if "train" in a.parts:
        argv = ["precompute", "--data", DATA, "--format", "hh", "--output", a.refs, "--limit", str(a.pairs),
                "--max-length", str(a.max_length), "--dtype", a.dtype, "--progress", "false"]
        proc = subprocess.run([sys.executable, str(ROOT / "pipeline.py"), *argv],
                              capture_output=True, text=True, env={**os.environ, "RAY_ADDRESS": ""})
        if proc.returncode:
            sys.exit(f"precompute for the training runs failed:\n{proc.stdout[-2000:]}{proc.stderr[-4000:]}")
        Path(a.order).write_text(json.dumps(stream_order(a.refs)))
        for gc in a.checkpointing.split(","):
            runs += [("trl_train_ref", gc), ("ours_train", gc), ("trl_train_precomputed", gc)]
    res = {}
    for mode, gc in runs:  # each in a fresh process
        argv = [sys.executable, __file__, "--worker", mode, "--refs", a.refs, "--order", a.order, "--gc", gc,
                "--pairs", str(a.pairs), "--steps", str(a.steps),
                "--batch", str(a.batch), "--micro", str(a.micro), "--max-length", str(a.max_length), "--dtype", a.dtype]
        proc = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "RAY_ADDRESS": ""})
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not line:
            sys.exit(f"{mode} failed:\n{proc.stderr[-4000:]}")
        res[mode, gc] = json.loads(line[-1][7:])
        print(f"{mode}{' (checkpointing ' + gc + ')' if 'train' in mode else ''}: {res[mode, gc]}", file=sys.stderr)
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
    print(f"\n{device}, {a.dtype}, {a.pairs} HH-RLHF pairs (SmolLM2-135M-Instruct, chat template), "
          f"max_length {a.max_length}")
    if "precompute" in a.parts:
        precompute_table(a, res[("ours_precompute", "off")], res[("trl_precompute", "off")])
    if "train" in a.parts:
        print(f"\n| training ({a.steps} steps of {a.batch} pairs, micro-batch {a.micro}, the same pairs in the same "
              "order) | gradient checkpointing | s / step | peak memory (MB) | time vs this | memory vs this |")
        print("|---|---|---:|---:|---:|---:|")
        for gc in a.checkpointing.split(","):
            me = res["ours_train", gc]
            for name, key in (("TRL, reference model in memory", "trl_train_ref"),
                              ("TRL, precomputed log-probs", "trl_train_precomputed"), ("this project", "ours_train")):
                r = res[key, gc]
                print(f"| {name} | {gc} | {r['seconds_per_step']:.2f} | {r['peak_mb']:.0f} | "
                      f"{r['seconds_per_step'] / me['seconds_per_step']:.2f}x | {r['peak_mb'] / me['peak_mb']:.2f}x |")


def precompute_table(a, ours: dict, trl: dict) -> None:
    peak = matmul_peak(a.dtype)
    from stages.core.runtime.models import embedded_model_path, load_model

    params = sum(p.numel() for p in load_model(str(embedded_model_path())).parameters())
    # The work the task needs: one forward over every distinct token (prompt once). MFU does not
    # credit prompt sharing; the tokens/s column counts the prompt twice, as a plain scorer runs it.
    flops = 2 * params * ours["unique_tokens"]
    print(f"\nmatmul peak {peak:.0f} GFLOP/s\n")
    print("| precompute (scoring, model loaded) | pairs/s | tokens/s | MFU | vs TRL |\n|---|---:|---:|---:|---:|")
    for name, r in (("TRL `precompute_ref_log_probs=True`", trl), ("this project (scorer)", ours)):
        print(f"| {name} | {r['pairs'] / r['seconds']:.2f} | {ours['tokens'] / r['seconds']:.0f} | "
              f"{flops / r['seconds'] / 1e9 / peak:.1%} | {trl['seconds'] / r['seconds']:.2f}x |")
    e2e = ours["end_to_end_seconds"]
    print(f"| this project, whole stage (Ray start, model load, Parquet) | {ours['pairs'] / e2e:.2f} | "
          f"{ours['tokens'] / e2e:.0f} | {flops / e2e / 1e9 / peak:.1%} | {trl['seconds'] / e2e:.2f}x |")


if __name__ == "__main__":
    main()
