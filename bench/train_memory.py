#!/usr/bin/env python
"""Peak memory of streaming training on 64 vs 2,048 pairs (tiny model, same number of steps).

    .venv/bin/python bench/train_memory.py [--steps 24] [--pairs 64,2048]

Each size is precomputed with a tiny random Llama (SmolLM2's tokenizer), then trained in its own
process; peak RSS is that process's ru_maxrss. Streaming means the ratio stays near 1.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

WORDS = "the a model answer question data reward policy token shard stream memory train pair good bad".split()


def make_data(path: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    say = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))  # noqa: E731
    with open(path, "w") as fh:
        for i in range(n):
            fh.write(json.dumps({"prompt": f"Q{i}: {say(rng.randint(20, 60))}?", "chosen": say(rng.randint(10, 40)),
                                 "rejected": say(rng.randint(10, 40))}) + "\n")


def make_model(path: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from stages.core.models import embedded_model_path, load_tokenizer

    tok = load_tokenizer(str(embedded_model_path()))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)


TRAIN = """
import resource, sys, json
sys.path.insert(0, {root!r})
from stages import train
from stages.core.config import TrainConfig
train.run(TrainConfig(refs={refs!r}, output={out!r}, max_steps={steps}, batch_size=8, micro_batch_size=4,
                      progress=False, overwrite=True))
print(json.dumps({{"max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--pairs", default="64,2048")
    args = ap.parse_args()
    from stages import precompute
    from stages.core.config import PrecomputeConfig

    sizes = [int(x) for x in args.pairs.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_model(tmp / "model")
        results = {}
        for n in sizes:
            make_data(tmp / f"in{n}.jsonl", n)
            precompute.run(PrecomputeConfig(data=str(tmp / f"in{n}.jsonl"), model=str(tmp / "model"),
                                            output=str(tmp / f"refs{n}"), rows_per_shard=256, batch_size=64,
                                            progress=False))
        for n in sizes:  # trained after all precomputes, each in a fresh process
            code = TRAIN.format(root=str(ROOT), refs=str(tmp / f"refs{n}"), out=str(tmp / f"run{n}"), steps=args.steps)
            proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                  env={**os.environ, "RAY_ADDRESS": ""})
            if proc.returncode:
                sys.exit(proc.stderr[-3000:])
            results[n] = json.loads(proc.stdout.strip().splitlines()[-1])["max_rss_mb"]
    base = results[sizes[0]]
    print(f"\n| pairs | steps | peak RSS (MB) | ratio to {sizes[0]} pairs |")
    print("|---:|---:|---:|---:|")
    for n in sizes:
        print(f"| {n} | {args.steps} | {results[n]:.0f} | {results[n] / base:.3f} |")


if __name__ == "__main__":
    main()
