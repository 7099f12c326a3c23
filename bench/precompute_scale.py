#!/usr/bin/env python
"""Precompute at scale: the stage's driver memory and pairs/s against one plain process, by data size.

    .venv/bin/python bench/precompute_scale.py [--sizes 10000,100000] [--big] [--batch-size 64] [--num-workers 1]
                                               [--out bench/results/precompute_scale-DATE.md]

Measures the data path (issue 16), so the model's scoring is made cheap: a micro model in a temp
folder, a byte-level BPE tokenizer (512 tokens) trained with `tokenizers` on the synthetic words,
wrapped as a transformers fast tokenizer with SmolLM2's real chat template and special tokens, and
a randomly initialised 2-layer Llama (hidden 64). The data: N short conversational preference pairs
(TRL's format, message lists; one user turn, some with an earlier exchange) made of a synthetic
vocabulary, deterministic by seed, every pair distinct, in one JSONL file.

For each size, in one run, each measurement in its own process:
  * the stage: `python pipeline.py precompute --data FILE --model DIR --output OUT --progress false
    --batch-size B --num-workers W`. Peak RSS is the DRIVER process's alone: its VmHWM (the kernel's
    high-water mark of its own memory) read from /proc/PID/status every 50 ms while it runs. Ray's
    processes (raylet, GCS, the tokenize and scorer workers) have memory of their own and are not
    counted.
  * the baseline: one plain Python process, no Ray, that streams the same JSONL, tokenizes every pair
    as TRL 1.16 does (`tokenization.tokenize_row`, then `Truncation.cut` and `.scored_sequence`) and scores
    chosen and rejected of B pairs at a time in one right-padded batch with a plain forward (full
    logits, log_softmax, gather). Its peak RSS: the same VmHWM, sampled by the parent and read by the
    process itself at its end.
Wall time is the whole process, start-up, imports, model load (and Ray's start) included, for both.
The baseline writes its log-probs; the stage's shards are compared with them (max difference).

Targets (issue 16): driver peak RSS for 100k pairs at most 1.2x that for 10k; the stage's pairs/s on
100k at least 1.5x the baseline's.
"""

from __future__ import annotations

import argparse
import array
import hashlib
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

VOCAB_WORDS = 200   # synthetic words
TOKENIZER_VOCAB = 512  # byte-level BPE: 256 bytes, 3 special tokens, the rest merges
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # SmolLM2's, in its order (ids 0, 1, 2)
POLL_SECONDS = 0.05


# ------------------------------------------------------------------------------------------------
# Synthetic data and the micro model

def synthetic_words(n: int = VOCAB_WORDS, seed: int = 0) -> list[str]:
    """n distinct pronounceable words of 1-3 syllables, deterministic by seed."""
    rng = random.Random(seed)
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    words: list[str] = []
    seen: set[str] = set()
    while len(words) < n:
        w = "".join(rng.choice(syllables) for _ in range(rng.choice((1, 2, 2, 3))))
        if w not in seen:
            seen.add(w)
            words.append(w)
    return words


def make_data(path: Path, n: int, words: list[str], seed: int = 0) -> None:
    """n distinct conversational pairs: a user question (a quarter after one earlier exchange) and two
    different assistant answers, each a handful of words."""
    rng = random.Random(seed)

    def say(lo: int, hi: int, end: str) -> str:
        text = " ".join(rng.choice(words) for _ in range(rng.randint(lo, hi)))
        return text[0].upper() + text[1:] + end

    seen: set[bytes] = set()
    with open(path, "w") as fh:
        written = 0
        while written < n:
            prompt = [{"role": "user", "content": say(6, 14, "?")}]
            if rng.random() < 0.25:
                prompt = [{"role": "user", "content": say(4, 8, "?")},
                          {"role": "assistant", "content": say(3, 8, ".")}] + prompt
            chosen, rejected = say(3, 10, "."), say(3, 10, ".")
            if chosen == rejected:
                continue
            line = json.dumps({"prompt": prompt, "chosen": [{"role": "assistant", "content": chosen}],
                               "rejected": [{"role": "assistant", "content": rejected}]})
            key = hashlib.blake2b(line.encode(), digest_size=8).digest()
            if key in seen:  # a duplicate pair would be a reject in the stage and scored by the baseline
                continue
            seen.add(key)
            fh.write(line + "\n")
            written += 1


def make_model(folder: Path, words: list[str], seed: int = 0) -> dict:
    """The micro model: BPE tokenizer on the synthetic words + SmolLM2's chat template, 2-layer Llama."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging

    from stages.core.runtime.models import embedded_model_path, load_tokenizer

    smol = load_tokenizer(str(embedded_model_path()))
    template = smol.chat_template
    # What the template itself writes (roles, the default system prompt) and sentences of the words.
    rng = random.Random(seed)
    corpus = ["system", "user", "assistant", "You are a helpful AI assistant named SmolLM, trained by Hugging Face"]
    corpus += [" ".join(rng.choice(words) for _ in range(12)) + rng.choice(".?") for _ in range(5000)]
    corpus += [w.capitalize() for w in words]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=TOKENIZER_VOCAB, special_tokens=SPECIAL_TOKENS,
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                         show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  unk_token="<|endoftext|>", pad_token="<|im_end|>", model_max_length=2048)
    tok.chat_template = template
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    hf_logging.disable_progress_bar()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return {"vocab": len(tok), "params": sum(p.numel() for p in model.parameters()),
            "template_same": load_tokenizer(str(folder)).chat_template == template}


# ------------------------------------------------------------------------------------------------
# The baseline: one plain process, run as `--worker baseline`

def vm_hwm_mib(pid: int | str = "self") -> float | None:
    """The kernel's peak RSS of that process alone (VmHWM), MiB; None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def baseline(data: str, model_dir: str, batch_size: int, max_length: int, values: str) -> dict:
    """Read, tokenize as TRL, score chosen+rejected of each batch in one right-padded plain forward."""
    import torch
    from transformers import AutoModelForCausalLM

    from stages.core.inputs.formats import RowRejected
    from stages.core.inputs.tokenization import tokenize_row
    from stages.core.runtime.models import load_tokenizer
    from stages.core.scoring.truncation import Truncation

    t = time.perf_counter()
    tok = load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    clock = {"load_seconds": time.perf_counter() - t, "tokenize_seconds": 0.0, "score_seconds": 0.0}
    pad = tok.pad_token_id
    truncation = Truncation(max_length)
    chosen_out, rejected_out = array.array("d"), array.array("d")
    counts = {"pairs": 0, "rejected": 0, "tokens": 0}

    def score(batch: list[dict]) -> None:
        t = time.perf_counter()
        seqs = [truncation.scored_sequence(r["prompt_ids"], r[k])
                for k in ("chosen_ids", "rejected_ids") for r in batch]
        width = max(len(s) for s, _ in seqs)
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        comp = torch.zeros((len(seqs), width), dtype=torch.bool)
        for i, (s, start) in enumerate(seqs):
            ids[i, :len(s)] = torch.tensor(s)
            mask[i, :len(s)] = 1
            comp[i, max(start, 1):len(s)] = True
        with torch.inference_mode():
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            logp = logits[:, :-1].float().log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
            sums = (logp.double() * comp[:, 1:]).sum(-1).tolist()
        n = len(batch)
        chosen_out.extend(sums[:n])
        rejected_out.extend(sums[n:])
        counts["pairs"] += n
        counts["tokens"] += sum(len(s) for s, _ in seqs)
        clock["score_seconds"] += time.perf_counter() - t

    batch: list[dict] = []
    with open(data) as fh:
        for line in fh:
            t = time.perf_counter()
            row = json.loads(line)
            try:
                batch.append(truncation.cut(tokenize_row(tok, row)))
                clock["tokenize_seconds"] += time.perf_counter() - t
            except RowRejected:
                counts["rejected"] += 1
                chosen_out.append(float("nan"))
                rejected_out.append(float("nan"))
                continue
            if len(batch) == batch_size:
                score(batch)
                batch = []
    if batch:
        score(batch)
    with open(values, "wb") as fh:
        chosen_out.tofile(fh)
        rejected_out.tofile(fh)
    return {**counts, **clock, "peak_mib": vm_hwm_mib()}


# ------------------------------------------------------------------------------------------------
# Measuring a process

def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of that process alone (its own threads, not its children); None once gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measured(argv: list[str], env: dict, log: Path) -> dict:
    """Run argv; its wall time, the peak of its own VmHWM and its own CPU time, sampled every POLL_SECONDS."""
    with open(log, "w") as out:
        t = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        peak = cpu = 0.0
        while proc.poll() is None:
            hwm, used = vm_hwm_mib(proc.pid), cpu_seconds(proc.pid)
            peak = max(peak, hwm or 0.0)
            cpu = max(cpu, used or 0.0)
            time.sleep(POLL_SECONDS)
        seconds = time.perf_counter() - t
    text = log.read_text()
    if proc.returncode:
        sys.exit(f"{' '.join(argv[:3])} ... failed (exit {proc.returncode}):\n{text[-4000:]}")
    return {"seconds": seconds, "peak_mib": peak, "cpu_seconds": cpu, "output": text}


def stage_values(output: Path) -> dict[int, tuple[float, float]]:
    import pyarrow.parquet as pq

    out = {}
    for f in sorted((output / "shards").glob("*.parquet")):
        t = pq.read_table(f, columns=["source_index", "ref_chosen_logps", "ref_rejected_logps"]).to_pydict()
        out.update(zip(t["source_index"], zip(t["ref_chosen_logps"], t["ref_rejected_logps"])))
    return out


def max_difference(stage: dict[int, tuple[float, float]], values: Path, n: int) -> float:
    both = array.array("d")
    with open(values, "rb") as fh:
        both.fromfile(fh, 2 * n)
    diff = 0.0
    for i, (c, r) in stage.items():
        diff = max(diff, abs(c - both[i]), abs(r - both[n + i]))
    return diff


def one_size(n: int, a, words: list[str], model_dir: Path, tmp: Path, env: dict) -> dict:
    data = tmp / f"pairs-{n}.jsonl"
    t = time.perf_counter()
    make_data(data, n, words, a.seed)
    print(f"[{n} pairs] data written in {time.perf_counter() - t:.1f} s ({data.stat().st_size / 2**20:.1f} MiB)",
          file=sys.stderr, flush=True)
    output = tmp / f"refs-{n}"
    argv = [sys.executable, str(ROOT / "pipeline.py"), "precompute", "--data", str(data), "--model", str(model_dir),
            "--output", str(output), "--progress", "false", "--batch-size", str(a.batch_size),
            "--num-workers", str(a.num_workers), "--max-length", str(a.max_length)]
    stage = measured(argv, env, tmp / f"stage-{n}.log")
    manifest = json.loads((output / "manifest.json").read_text())
    stage.update(pairs=manifest["rows_written"], rejected=manifest["rows_rejected"], tokens=manifest["tokens"],
                 run_seconds=manifest["last_run"]["seconds"], shards=len(manifest["shards"]))
    print(f"[{n} pairs] stage: {stage['seconds']:.1f} s, driver peak RSS {stage['peak_mib']:.0f} MiB, "
          f"{stage['pairs']} pairs written, {stage['rejected']} rejected, run() {stage['run_seconds']:.1f} s",
          file=sys.stderr, flush=True)
    values = tmp / f"baseline-{n}.f64"
    argv = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(
        {"data": str(data), "model_dir": str(model_dir), "batch_size": a.batch_size, "max_length": a.max_length,
         "values": str(values)})]
    base = measured(argv, env, tmp / f"baseline-{n}.log")
    line = [x for x in base["output"].splitlines() if x.startswith("RESULT ")]
    result = json.loads(line[-1][len("RESULT "):])
    base.update(pairs=result["pairs"], rejected=result["rejected"], tokens=result["tokens"],
                **{k: result[k] for k in ("load_seconds", "tokenize_seconds", "score_seconds")},
                peak_mib=max(base["peak_mib"], result["peak_mib"] or 0.0))
    print(f"[{n} pairs] baseline: {base['seconds']:.1f} s, peak RSS {base['peak_mib']:.0f} MiB, "
          f"{base['pairs']} pairs scored, {base['rejected']} rejected", file=sys.stderr, flush=True)
    diff = max_difference(stage_values(output), values, n)
    shutil.rmtree(output, ignore_errors=True)
    data.unlink()
    values.unlink()
    return {"n": n, "stage": stage, "baseline": base, "max_diff": diff}


# ------------------------------------------------------------------------------------------------
# Report

def _git() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    dirty = git("status", "--porcelain", "--", "stages", "pipeline.py", "schemas")
    state = "stages/, pipeline.py or schemas/ modified" if dirty else "clean stages/, pipeline.py, schemas/"
    mine = git("status", "--porcelain", "--", "bench/precompute_scale.py")
    if mine:
        state += "; bench/precompute_scale.py " + ("uncommitted" if mine.startswith("??") else "modified")
    return f"{git('rev-parse', '--short', 'HEAD')} ({state})"


def _machine() -> str:
    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    load = os.getloadavg()[0]
    return (f"{platform.system()} {platform.machine()}, {cpu or 'CPU'}, {os.cpu_count()} cores, {mem:.0f} GiB RAM; "
            f"load average {load:.2f} at the start")


def _ratio_line(name: str, value: float, target: str, holds: bool) -> str:
    return f"- {name}: {value:.2f}x (target {target}): {'HOLDS' if holds else 'DOES NOT HOLD'}"


def report(results: list[dict]) -> list[str]:
    lines = ["| pairs | stage s | stage pairs/s | stage driver peak RSS MiB | baseline s | baseline pairs/s | "
             "baseline peak RSS MiB | stage/baseline speed |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        s, b = r["stage"], r["baseline"]
        s_rate, b_rate = s["pairs"] / s["seconds"], b["pairs"] / b["seconds"]
        lines.append(f"| {r['n']:,} | {s['seconds']:.1f} | {s_rate:.0f} | {s['peak_mib']:.0f} | {b['seconds']:.1f} | "
                     f"{b_rate:.0f} | {b['peak_mib']:.0f} | {s_rate / b_rate:.2f}x |")
    lines.append("")
    by_n = {r["n"]: r for r in results}
    small, large = (10_000, 100_000) if {10_000, 100_000} <= set(by_n) else (min(by_n), max(by_n))
    named = "" if (small, large) == (10_000, 100_000) else (
        f" (measured on {small:,} and {large:,} pairs; the targets name 10k and 100k)")
    lines.append(f"Targets (issue 16){named}:")
    if small != large:
        rss = by_n[large]["stage"]["peak_mib"] / by_n[small]["stage"]["peak_mib"]
        lines.append(_ratio_line(f"driver peak RSS, {large:,} / {small:,} pairs", rss, "<= 1.2x", rss <= 1.2))
    s, b = by_n[large]["stage"], by_n[large]["baseline"]
    speed = (s["pairs"] / s["seconds"]) / (b["pairs"] / b["seconds"])
    lines.append(_ratio_line(f"stage pairs/s / baseline pairs/s on {large:,} pairs", speed, ">= 1.5x", speed >= 1.5))
    lines.append("")
    for r in results:
        s, b = r["stage"], r["baseline"]
        lines.append(f"- {r['n']:,} pairs, stage: {s['pairs']:,} pairs written ({s['rejected']} rejected) in "
                     f"{s['shards']} shards, {s['tokens']:,} tokens; run() {s['run_seconds']:.1f} s of the "
                     f"{s['seconds']:.1f} s process ({s['pairs'] / s['run_seconds']:.0f} pairs/s); the driver process "
                     f"used {s['cpu_seconds']:.1f} s of CPU")
        lines.append(f"- {r['n']:,} pairs, baseline: {b['pairs']:,} pairs scored ({b['rejected']} rejected), "
                     f"{b['tokens']:,} tokens (prompt twice, padding not counted); start-up and imports "
                     f"{b['seconds'] - b['load_seconds'] - b['tokenize_seconds'] - b['score_seconds']:.1f} s, "
                     f"tokenizer+model load {b['load_seconds']:.1f} s, reading+tokenizing "
                     f"{b['tokenize_seconds']:.1f} s, padding+forward {b['score_seconds']:.1f} s; "
                     f"max |stage - baseline| log-prob {r['max_diff']:.2e}")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10000,100000", help="comma list of pair counts")
    ap.add_argument("--big", action="store_true", help="add 1,000,000 pairs")
    ap.add_argument("--batch-size", type=int, default=64,
                    help="pairs per scorer call (stage) and per right-padded forward of chosen+rejected (baseline)")
    ap.add_argument("--num-workers", type=int, default=1,
                    help="scorer actors of the stage (2 cores: one actor of one CPU, two threads)")
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="also write the report, with a header, to this markdown file")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        print("RESULT " + json.dumps(baseline(**json.loads(a.worker))), flush=True)
        return
    sizes = [int(x) for x in a.sizes.split(",") if x.strip()]
    if a.big and 1_000_000 not in sizes:
        sizes.append(1_000_000)
    started = datetime.now(timezone.utc)
    t0 = time.perf_counter()
    env = {**os.environ, "RAY_ADDRESS": "", "TOKENIZERS_PARALLELISM": "false"}
    import ray
    import tokenizers
    import torch
    import transformers

    head = [f"bench/precompute_scale.py: {started:%Y-%m-%d %H:%M:%S} UTC; git {_git()}; {_machine()}",
            f"torch {torch.__version__}, transformers {transformers.__version__}, tokenizers {tokenizers.__version__}, "
            f"ray {ray.__version__}, Python {platform.python_version()}"]
    words = synthetic_words(seed=a.seed)
    with tempfile.TemporaryDirectory(prefix="precompute_scale-") as tmpdir:
        tmp = Path(tmpdir)
        model_dir = tmp / "micro-model"
        info = make_model(model_dir, words, a.seed)
        head.append(f"Micro model: byte-level BPE tokenizer trained on {len(words)} synthetic words (vocab "
                    f"{info['vocab']}), SmolLM2's chat template (copied: {info['template_same']}) and special tokens; "
                    f"Llama, 2 layers, hidden 64, {info['params']:,} parameters, float32. Data: short conversational "
                    f"pairs (message lists), every pair distinct, seed {a.seed}.")
        head.append(f"Stage: `pipeline.py precompute --progress false --batch-size {a.batch_size} --num-workers "
                    f"{a.num_workers} --max-length {a.max_length}` (rows per shard: the default). Baseline: one "
                    f"process, no Ray, {a.batch_size} pairs (chosen and rejected: {2 * a.batch_size} sequences) per "
                    f"right-padded forward, torch threads {torch.get_num_threads()}. Wall time: whole process, "
                    "start-up included. Peak RSS: the process's own VmHWM (Ray's processes not counted).")
        print("\n".join(head) + "\n", flush=True)
        results = []
        for n in sizes:
            results.append(one_size(n, a, words, model_dir, tmp, env))
    lines = report(results)
    lines.append(f"\nWall time of the whole benchmark: {time.perf_counter() - t0:.0f} s")
    print("\n".join(lines), flush=True)
    if a.out:
        command = "`.venv/bin/python " + " ".join(["bench/precompute_scale.py", *sys.argv[1:]]) + "`"
        ended = datetime.now(timezone.utc)
        text = (f"# bench/precompute_scale.py, {started:%Y-%m-%d}\n\nCommand: {command}. One run, reported as it came, "
                f"{started:%Y-%m-%d %H:%M:%S}-{ended:%H:%M:%S} UTC. Full stdout follows.\n\n"
                + "\n".join(head) + "\n\n" + "\n".join(lines) + "\n")
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(text)
        print(f"-> {a.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
