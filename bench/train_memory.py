#!/usr/bin/env python
"""Peak memory of a full training epoch: 64 vs 16,384 pairs through a 16-pair shuffle buffer.

    .venv/bin/python bench/train_memory.py [--pairs 64,16384] [--shuffle-buffer 16] [--batch 64] [--micro 16]

A streaming trainer holds one Parquet row group and the shuffle buffer, never the set, so its peak
memory must not grow with the number of pairs. This trains one FULL epoch of each set (16,384
pairs at 64 a step is 256 steps), with a shuffle buffer far smaller than either set.

Set-up: a tiny randomly initialised Llama with SmolLM2's tokenizer; synthetic pairs, each distinct
(its index is in the prompt) and all of the same token length, so every micro-batch has the same
shape in both sets and activation memory cannot differ between them; long prompts and short answers
(the 49k-vocab LM head runs only on answer tokens), so an epoch is quick while each pair still holds
about a hundred token ids. Shards are written by the real precompute stage. Every measurement runs
in its own fresh process; peak memory is the RSS of that process plus its children (sampled every
20 ms), or the process's own kernel-recorded peak (ru_maxrss) when that is higher. Those processes
run with MALLOC_MMAP_THRESHOLD_=1 MiB (glibc): freed tensors leave RSS at once instead of staying
in the heap, which otherwise adds tens of MB of run-to-run noise (`--glibc-default` turns it off).

Rows of the training table:
  * the small set, one epoch: a single step, whose peak comes before AdamW allocates its state
    (so it sits lower than any longer run; shown, not used as the reference);
  * the small set for as many epochs as the large set has steps: the BASELINE, the same steps and
    micro-batch shapes as the measurement, only the set size differs;
  * the large set, one epoch: the measurement;
  * the large set with the whole epoch listed in memory before training (a simulated failure, a
    few steps): what the table shows when a trainer holds the set.
Under the table: the memory a pair takes when held as the stream yields it (measured in a fresh
process), and so the size of the effect the benchmark detects.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from process_memory import peak_rss_mb, watch_process_tree  # noqa: E402  (bench/, beside this script)

# Candidate words; those SmolLM2's tokenizer makes one token (with a leading space) are used, so a
# pair's length in tokens depends only on its word counts.
CANDIDATES = ("the a model answer question data reward policy token stream memory train pair good bad river "
              "music garden window paper light stone water market teacher forest winter summer city road "
              "yellow green quick slow happy small large old new bright dark cold warm simple").split()
# Long prompts and short answers: the LM head (49k vocab) runs only on answer tokens, so this keeps an
# epoch fast while each pair still holds ~100 token ids (the memory a trainer that held the set pays).
PROMPT_WORDS, ANSWER_WORDS = 90, 2


def single_token_words(tok) -> list[str]:
    return [w for w in CANDIDATES if len(tok(" " + w, add_special_tokens=False)["input_ids"]) == 1]


def make_data(path: Path, n: int, words: list[str], seed: int = 0) -> None:
    """n distinct pairs of one token length: `Question 00042: <90 words>?`, answers of 2 words."""
    rng = random.Random(seed)
    say = lambda k: " ".join(rng.choice(words) for _ in range(k))  # noqa: E731
    with open(path, "w") as fh:
        for i in range(n):
            chosen = rejected = say(ANSWER_WORDS)
            while rejected == chosen:  # identical answers are rejected by precompute
                rejected = say(ANSWER_WORDS)
            fh.write(json.dumps({"prompt": f"Question {i:05d}: {say(PROMPT_WORDS)}?", "chosen": " " + chosen,
                                 "rejected": " " + rejected}) + "\n")


def make_model(path: Path) -> list[str]:
    """tests/conftest.py's make_tiny_model, saved like a checkpoint; returns the words to use."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from stages.core.runtime.models import embedded_model_path, load_tokenizer

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

def hold_whole_set() -> None:
    """The failure the benchmark must catch: the trainer's stream lists the whole epoch first."""
    from stages.core.refs import stream
    from stages.core.training import trainer

    def batches(refs, batch_size, seed, buffer_size, start_epoch=0, skip=0, verify=True):
        held = list(stream.epoch_pairs(refs, start_epoch, seed, buffer_size, verify))  # every pair, at once
        while True:
            for i in range(0, len(held), batch_size):
                yield start_epoch, min(i + batch_size, len(held)), held[i:i + batch_size]

    trainer.batches = batches


def work(job: dict) -> dict:
    if job["kind"] == "precompute":
        from stages import precompute
        from stages.core.config.options import PrecomputeConfig

        t = time.perf_counter()
        m = precompute.run(PrecomputeConfig(data=job["data"], model=job["model"], output=job["output"],
                                            format="standard", max_length=job["max_length"],
                                            rows_per_shard=job["rows_per_shard"], batch_size=64, progress=False))
        return {"seconds": time.perf_counter() - t, "peak_mb": peak_rss_mb(), "rows": m["rows_written"],
                "rejected": m["rows_rejected"], "shards": len(m["shards"]), "tokens": m["tokens"]}
    if job["kind"] == "train":
        from stages import train
        from stages.core.config.options import TrainConfig

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
        import tracemalloc

        import psutil

        from stages.core.refs.stream import epoch_pairs, iter_rows, load_refs, verify_shard

        refs = load_refs(job["refs"])
        for shard, url in zip(refs.manifest["shards"], refs.shard_urls()):
            verify_shard(url, shard["sha256"])  # the checksum path warmed up before measuring
        next(iter_rows(url))  # pyarrow's reader warmed up on one row
        gc.collect()
        before = psutil.Process().memory_info().rss
        held = list(epoch_pairs(refs, 0, 0, job["shuffle_buffer"]))
        gc.collect()
        grown = psutil.Process().memory_info().rss - before
        tokens = sum(len(p["prompt_ids"]) + len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in held)
        lengths = sorted({(len(p["prompt_ids"]), len(p["chosen_ids"]), len(p["rejected_ids"])) for p in held})
        out = {"pairs": len(held), "bytes": grown, "tokens": tokens, "lengths": lengths[:5],
               "distinct_ids": len({p["pair_id"] for p in held})}
        del held
        gc.collect()
        tracemalloc.start()  # the Python objects' own bytes, allocator slack not counted
        held = list(epoch_pairs(refs, 0, 0, job["shuffle_buffer"]))
        out["traced_bytes"] = tracemalloc.get_traced_memory()[0]
        return out
    raise ValueError(job["kind"])


MMAP_THRESHOLD = 1 << 20


def spawn(job: dict, env: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], capture_output=True, text=True,
                          env={**os.environ, "RAY_ADDRESS": "", **env})
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
    ap.add_argument("--fail-steps", type=int, default=4, help="steps of the simulated whole-set failure (2 or more)")
    ap.add_argument("--glibc-default", action="store_true",
                    help=f"leave glibc's malloc as it is (default: MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD} in the "
                         "measured processes, so freed tensors leave RSS at once and peaks track live memory)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        watch_process_tree()
        print("RESULT " + json.dumps(work(json.loads(a.worker))), flush=True)
        return
    small, large = (int(x) for x in a.pairs.split(","))
    assert small < large and a.shuffle_buffer < small and a.fail_steps >= 2, "need buffer < small < large"
    env = {} if a.glibc_default else {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        words = make_model(tmp / "model")
        pre = {}
        for n in (small, large):
            make_data(tmp / f"in{n}.jsonl", n, words)
            pre[n] = spawn({"kind": "precompute", "label": f"precompute {n}", "data": str(tmp / f"in{n}.jsonl"),
                            "model": str(tmp / "model"), "output": str(tmp / f"refs{n}"), "max_length": a.max_length,
                            "rows_per_shard": a.rows_per_shard}, env)
            assert pre[n]["rows"] == n and not pre[n]["rejected"], f"precompute kept {pre[n]['rows']} of {n} pairs"
        held = spawn({"kind": "held_set", "refs": str(tmp / f"refs{large}"), "shuffle_buffer": a.shuffle_buffer}, env)
        assert held["distinct_ids"] == large and len(held["lengths"]) == 1, held
        large_steps = -(-large // a.batch)
        base = {"batch": a.batch, "micro": a.micro, "shuffle_buffer": a.shuffle_buffer}
        plan = {"first": (f"{small:,} pairs, 1 epoch (one step: its peak precedes the AdamW state)", small,
                          {"epochs": 1}),
                "base": (f"{small:,} pairs, {large_steps} epochs (**baseline**: the small set, the large set's "
                         "step count)", small, {"epochs": large_steps}),
                "large": (f"{large:,} pairs, 1 epoch (**the measurement**)", large, {"epochs": 1}),
                "fail": (f"{large:,} pairs, whole set held in memory (simulated failure: the stream listed "
                         f"first; {a.fail_steps} steps)", large,
                         {"epochs": 1, "max_steps": a.fail_steps, "hold_whole_set": True})}
        runs = {}
        for key, (label, n, extra) in plan.items():
            runs[key] = spawn({"kind": "train", "label": label, "refs": str(tmp / f"refs{n}"),
                               "output": str(tmp / f"run-{key}"), **base, **extra}, env)
    total = time.perf_counter() - started

    (p_len, c_len, r_len), = held["lengths"]
    print(f"Tiny Llama (2 layers, hidden 32, SmolLM2 tokenizer, vocab 49,152), CPU, {os.cpu_count()} cores; "
          f"every pair {p_len} prompt + {c_len} chosen + {r_len} rejected tokens; batch {a.batch} pairs, "
          f"micro-batch {a.micro}; shards of {a.rows_per_shard} rows (row groups of 256); glibc malloc "
          + ("as is" if a.glibc_default else f"with MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD}") + "\n")
    print("| precompute (whole stage, Ray included) | pairs | shards | peak RSS of the process tree (MB) | seconds |")
    print("|---|---:|---:|---:|---:|")
    for n in (small, large):
        print(f"| {n:,} pairs | {pre[n]['rows']:,} | {pre[n]['shards']} | {pre[n]['peak_mb']:.0f} | "
              f"{pre[n]['seconds']:.1f} |")
    ref = runs["base"]["peak_mb"]
    print("\n| training run | pairs | steps | shuffle buffer | peak RSS (MB) | ratio to the baseline | seconds |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for key, (label, n, _) in plan.items():
        r = runs[key]
        print(f"| {label} | {n:,} | {r['steps']} | {a.shuffle_buffer} | {r['peak_mb']:.0f} | "
              f"{r['peak_mb'] / ref:.3f} | {r['seconds']:.1f} |")
    per_pair = held["bytes"] / held["pairs"]
    effect = per_pair * (large - small) / 2**20
    measured = runs["large"]["peak_mb"] - ref
    failed = runs["fail"]["peak_mb"] - ref
    print(f"\nSize of the effect this benchmark detects: {large:,} pairs held as the stream yields them (dicts of "
          f"Python lists, {held['tokens'] / held['pairs']:.0f} token ids a pair) grow a fresh process's RSS by "
          f"{held['bytes'] / 2**20:.1f} MB: {per_pair:.0f} bytes per pair ({held['traced_bytes'] / held['pairs']:.0f} "
          f"bytes of Python objects by tracemalloc). A trainer that held the set would need about {effect:.0f} MB "
          f"more for {large:,} pairs than for {small} (ratio about {(ref + effect) / ref:.2f} instead of 1.00).")
    print(f"\nObserved against the baseline: streaming {large:,} pairs {measured:+.0f} MB "
          f"({measured / effect:.0%} of the whole-set cost); the simulated whole-set failure {failed:+.0f} MB "
          f"({failed / effect:.0%}).")
    print(f"\nWall time of the whole benchmark: {total:.0f} s")


if __name__ == "__main__":
    main()
