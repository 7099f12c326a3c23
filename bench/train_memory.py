#!/usr/bin/env python
"""Peak memory of a full training epoch: 64 vs 16,384 pairs through a 16-pair shuffle buffer.

    .venv/bin/python bench/train_memory.py [--pairs 64,16384] [--shuffle-buffer 16] [--batch 64] [--micro 16]

A streaming trainer holds one Parquet row group and the shuffle buffer, never the set, so its peak
memory must not grow with the number of pairs. This trains one FULL epoch of each set (16,384
pairs at 64 a step is 256 steps), with a shuffle buffer far smaller than either set.

Set-up: a tiny randomly initialised Llama with SmolLM2's tokenizer; synthetic pairs, each distinct
(its index is in the prompt) and all of the same token length, so every micro-batch has the same
shape in both sets and activation memory cannot differ between them; shards written by the real
precompute stage. Every measurement runs in its own fresh process; peak memory is the RSS of that
process plus its children (sampled every 20 ms), or the process's own kernel-recorded peak
(ru_maxrss) when that is higher.

Rows of the table:
  * the small set, one epoch (the baseline);
  * the small set for as many epochs as the large set has steps (a control: the same number of
    steps, so growth with steps alone, e.g. allocator drift, is told apart from growth with the set);
  * the large set, one epoch: the measurement;
  * the large set with the whole epoch listed in memory before training (a simulated failure, a
    few steps only): what the table shows when a trainer holds the set.
Under the table: the memory one pair takes when held as the stream yields it (measured), and so the
size of the effect the benchmark detects.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Candidate words; those SmolLM2's tokenizer makes one token (with a leading space) are used, so a
# pair's length in tokens depends only on its word counts.
CANDIDATES = ("the a model answer question data reward policy token stream memory train pair good bad river "
              "music garden window paper light stone water market teacher forest winter summer city road "
              "yellow green quick slow happy small large old new bright dark cold warm simple").split()
PROMPT_WORDS, ANSWER_WORDS = 24, 10


def single_token_words(tok) -> list[str]:
    return [w for w in CANDIDATES if len(tok(" " + w, add_special_tokens=False)["input_ids"]) == 1]


def make_data(path: Path, n: int, words: list[str], seed: int = 0) -> None:
    """n distinct pairs of one token length: `Question 00042: <24 words>?`, answers of 10 words."""
    rng = random.Random(seed)
    say = lambda k: " ".join(rng.choice(words) for _ in range(k))  # noqa: E731
    with open(path, "w") as fh:
        for i in range(n):
            fh.write(json.dumps({"prompt": f"Question {i:05d}: {say(PROMPT_WORDS)}?",
                                 "chosen": " " + say(ANSWER_WORDS), "rejected": " " + say(ANSWER_WORDS)}) + "\n")


def make_model(path: Path) -> list[str]:
    """tests/conftest.py's make_tiny_model, saved like a checkpoint; returns the words to use."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from stages.core.models import embedded_model_path, load_tokenizer

    tok = load_tokenizer(str(embedded_model_path()))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                      tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return single_token_words(tok)


# ------------------------------------------------------------------------------------------------
# Workers: each runs in a fresh process (`--worker JSON`) and prints one RESULT line.

_TREE_PEAK = [0.0]


def watch_process_tree(interval: float = 0.02) -> None:
    """Sample the RSS of this process plus all its descendants (Ray workers) in a thread."""
    import threading

    import psutil

    me = psutil.Process()

    def loop():
        while True:
            total = 0
            for proc in [me, *me.children(recursive=True)]:
                try:
                    total += proc.memory_info().rss
                except psutil.Error:  # exited between listing and reading
                    pass
            _TREE_PEAK[0] = max(_TREE_PEAK[0], total / 2**20)
            time.sleep(interval)

    threading.Thread(target=loop, daemon=True).start()


def peak_rss_mb() -> float:
    """Peak RSS of the process tree (sampled), or this process's exact peak when that is higher."""
    return max(_TREE_PEAK[0], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def hold_whole_set() -> None:
    """The failure the benchmark must catch: the trainer's stream lists the whole epoch first."""
    from stages.core import shard_stream, trainer

    def batches(refs, batch_size, seed, buffer_size, start_epoch=0, skip=0, verify=True):
        held = list(shard_stream.epoch_pairs(refs, start_epoch, seed, buffer_size, verify))  # every pair, at once
        while True:
            for i in range(0, len(held), batch_size):
                yield start_epoch, min(i + batch_size, len(held)), held[i:i + batch_size]

    trainer.batches = batches


def work(job: dict) -> dict:
    if job["kind"] == "precompute":
        from stages import precompute
        from stages.core.config import PrecomputeConfig

        t = time.perf_counter()
        m = precompute.run(PrecomputeConfig(data=job["data"], model=job["model"], output=job["output"],
                                            format="standard", max_length=job["max_length"],
                                            rows_per_shard=job["rows_per_shard"], batch_size=64, progress=False))
        return {"seconds": time.perf_counter() - t, "peak_mb": peak_rss_mb(), "rows": m["rows_written"],
                "rejected": m["rows_rejected"], "shards": len(m["shards"]), "tokens": m["tokens"]}
    if job["kind"] == "train":
        from stages import train
        from stages.core.config import TrainConfig

        if job.get("hold_whole_set"):
            hold_whole_set()
        t = time.perf_counter()
        s = train.run(TrainConfig(refs=job["refs"], output=job["output"], epochs=job["epochs"],
                                  max_steps=job.get("max_steps"), batch_size=job["batch"],
                                  micro_batch_size=job["micro"], shuffle_buffer=job["shuffle_buffer"],
                                  progress=False, overwrite=True))
        return {"seconds": time.perf_counter() - t, "peak_mb": peak_rss_mb(), "steps": s["steps"],
                "total_steps": s["total_steps"], "outcome": s["outcome"], "loss": s["last"].get("loss")}
    if job["kind"] == "held_set":
        # The memory the pairs take when held as the stream yields them (lists of Python ints, dicts).
        import gc

        import psutil

        from stages.core.shard_stream import epoch_pairs, load_refs

        refs = load_refs(job["refs"])
        for _ in epoch_pairs(refs, 0, 0, job["shuffle_buffer"]):  # warm: imports, checksums, Arrow pools
            pass
        gc.collect()
        before = psutil.Process().memory_info().rss
        held = list(epoch_pairs(refs, 0, 0, job["shuffle_buffer"]))
        gc.collect()
        grown = psutil.Process().memory_info().rss - before
        tokens = sum(len(p["prompt_ids"]) + len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in held)
        lengths = sorted({(len(p["prompt_ids"]), len(p["chosen_ids"]), len(p["rejected_ids"])) for p in held})
        return {"pairs": len(held), "bytes": grown, "tokens": tokens, "lengths": lengths[:5],
                "distinct_ids": len({p["pair_id"] for p in held})}
    raise ValueError(job["kind"])


def spawn(job: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], capture_output=True, text=True,
                          env={**os.environ, "RAY_ADDRESS": ""})
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not line:
        sys.exit(f"{job['kind']} failed:\n{proc.stderr[-4000:]}")
    out = json.loads(line[-1][len("RESULT "):])
    print(f"{job.get('label', job['kind'])}: {out}", file=sys.stderr, flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", default="64,16384", help="small,large set sizes")
    ap.add_argument("--shuffle-buffer", type=int, default=16)
    ap.add_argument("--batch", type=int, default=64, help="pairs per optimizer step")
    ap.add_argument("--micro", type=int, default=16, help="pairs per forward")
    ap.add_argument("--rows-per-shard", type=int, default=1024)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--fail-steps", type=int, default=4, help="steps of the simulated whole-set failure")
    ap.add_argument("--no-control", action="store_true", help="skip the small set trained for as many steps")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        watch_process_tree()
        print("RESULT " + json.dumps(work(json.loads(a.worker))), flush=True)
        return
    small, large = (int(x) for x in a.pairs.split(","))
    assert small < large and a.shuffle_buffer < small, "need small < large and a buffer below both"
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        words = make_model(tmp / "model")
        pre = {}
        for n in (small, large):
            make_data(tmp / f"in{n}.jsonl", n, words)
            pre[n] = spawn({"kind": "precompute", "label": f"precompute {n}", "data": str(tmp / f"in{n}.jsonl"),
                            "model": str(tmp / "model"), "output": str(tmp / f"refs{n}"), "max_length": a.max_length,
                            "rows_per_shard": a.rows_per_shard})
            assert pre[n]["rows"] == n and not pre[n]["rejected"], f"precompute kept {pre[n]['rows']} of {n} pairs"
        held = spawn({"kind": "held_set", "refs": str(tmp / f"refs{large}"), "shuffle_buffer": a.shuffle_buffer})
        assert held["distinct_ids"] == large and len(held["lengths"]) == 1, held
        large_steps = -(-large // a.batch)
        base = {"batch": a.batch, "micro": a.micro, "shuffle_buffer": a.shuffle_buffer}
        plan = [(f"{small} pairs, 1 epoch (baseline)", small, {"epochs": 1}),
                (f"{small} pairs, {large_steps} epochs (control: same steps as {large})", small,
                 {"epochs": large_steps}),
                (f"{large} pairs, 1 epoch (the measurement)", large, {"epochs": 1}),
                (f"{large} pairs, whole set held in memory (simulated failure, {a.fail_steps} steps)", large,
                 {"epochs": 1, "max_steps": a.fail_steps, "hold_whole_set": True})]
        if a.no_control:
            del plan[1]
        rows = []
        for i, (label, n, extra) in enumerate(plan):
            r = spawn({"kind": "train", "label": label, "refs": str(tmp / f"refs{n}"), "output": str(tmp / f"run{i}"),
                       **base, **extra})
            rows.append((label, n, r))
    total = time.perf_counter() - started

    (p_len, c_len, r_len), = held["lengths"]
    print(f"Tiny Llama (2 layers, hidden 32, SmolLM2 tokenizer, vocab 49,152), CPU, {os.cpu_count()} cores; "
          f"every pair {p_len} prompt + {c_len} chosen + {r_len} rejected tokens; batch {a.batch} pairs, "
          f"micro-batch {a.micro}; shards of {a.rows_per_shard} rows (row groups of 256)\n")
    print("| precompute | pairs | shards | peak RSS (MB) | seconds |\n|---|---:|---:|---:|---:|")
    for n in (small, large):
        print(f"| {n:,} pairs | {pre[n]['rows']:,} | {pre[n]['shards']} | {pre[n]['peak_mb']:.0f} | "
              f"{pre[n]['seconds']:.1f} |")
    ref = rows[0][2]["peak_mb"]
    print(f"\n| training run | pairs | steps | shuffle buffer | peak RSS (MB) | ratio to {small} pairs | seconds |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, n, r in rows:
        print(f"| {label} | {n:,} | {r['steps']} | {a.shuffle_buffer} | {r['peak_mb']:.0f} | "
              f"{r['peak_mb'] / ref:.3f} | {r['seconds']:.1f} |")
    per_pair = held["bytes"] / held["pairs"]
    effect = per_pair * (large - small) / 2**20
    measured = rows[-2][2]["peak_mb"] - ref
    failed = rows[-1][2]["peak_mb"] - ref
    print(f"\nSize of the effect this benchmark detects: {large:,} pairs held as the stream yields them take "
          f"{held['bytes'] / 2**20:.1f} MB ({per_pair:.0f} bytes per pair, {held['tokens'] / held['pairs']:.0f} token "
          f"ids each; measured by listing one epoch in a fresh process), so a trainer that held the set would "
          f"need about {effect:.0f} MB more at {large:,} pairs than at {small} (ratio about "
          f"{(ref + effect) / ref:.2f}). The simulated failure needed {failed:+.0f} MB; the streaming epoch over "
          f"{large:,} pairs needed {measured:+.0f} MB ({measured / effect:.0%} of the whole-set cost).")
    print(f"\nWall time of the whole benchmark: {total:.0f} s")


if __name__ == "__main__":
    main()
