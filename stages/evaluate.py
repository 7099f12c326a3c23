"""`pipeline.py eval`: score a held-out set with a policy against the shards' reference log-probs.

Reports preference accuracy of the implicit reward, mean margin, chosen / rejected rewards and an
estimate of KL(policy || reference) on the data's chosen and rejected completions (mean
per-sequence log-ratio, and per token), as eval.json and a small table. With --samples N it also
generates answers from the reference and the policy for N held-out prompts, with the same seeded
decoding, next to the data's chosen answer (samples.md, samples.jsonl). The held-out set is
streamed from its shards: one micro-batch of pairs is in memory at a time, whatever its size.
"""

from __future__ import annotations

import json
import os

import torch

from stages.core import storage
from stages.core.config import EvalConfig, public
from stages.core.devices import pick_device
from stages.core.models import load_model, resolve_model
from stages.core.policy_pass import heldout_metrics, load_policy, pass_context
from stages.core.shard_stream import Refs, epoch_pairs, load_refs

ROWS = [("preference accuracy", "eval/rewards/accuracies"), ("mean margin", "eval/rewards/margins"),
        ("reward chosen", "eval/rewards/chosen"), ("reward rejected", "eval/rewards/rejected"),
        ("KL chosen (per seq)", "eval/kl/chosen"), ("KL rejected (per seq)", "eval/kl/rejected"),
        ("KL chosen (per token)", "eval/kl_per_token/chosen"),
        ("KL rejected (per token)", "eval/kl_per_token/rejected"),
        ("loss", "eval/loss")]


def output_dir(cfg: EvalConfig) -> str:
    if cfg.output:
        return cfg.output
    return storage.join(cfg.model, "eval") if cfg.model else "runs/eval"


def table(results: dict) -> str:
    lines = ["| metric | value |", "|---|---:|"]
    lines += [f"| {name} | {results[key]:.4f} |" for name, key in ROWS if key in results]
    return "\n".join(lines)


def _generate(model, prompt_ids: list[int], cfg: EvalConfig, seed: int, eos_id: int) -> list[int]:
    torch.manual_seed(seed)
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=model.device)
    sample = cfg.temperature > 0
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=cfg.max_new_tokens,
                         do_sample=sample, temperature=cfg.temperature if sample else None,
                         top_p=cfg.top_p if sample else None, pad_token_id=eos_id, eos_token_id=eos_id)
    return out[0, len(prompt_ids):].tolist()


def samples(cfg: EvalConfig, refs: Refs, policy, tokenizer, reference_path: str) -> list[dict]:
    """Answers from the reference and the policy for the first N held-out prompts (fixed order)."""
    pairs = []
    for p in epoch_pairs(refs, 0, 0, 1):
        pairs.append(p)
        if len(pairs) == cfg.samples:
            break
    reference = load_model(reference_path, str(policy.dtype).replace("torch.", ""), str(policy.device)).eval()
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True).strip()  # noqa: E731
    out = []
    with torch.no_grad():
        for i, p in enumerate(pairs):
            seed = cfg.seed + i  # the same draw for both models
            out.append({"pair_id": p["pair_id"], "prompt": decode(p["prompt_ids"]), "chosen": decode(p["chosen_ids"]),
                        "reference": decode(_generate(reference, p["prompt_ids"], cfg, seed, tokenizer.eos_token_id)),
                        "policy": decode(_generate(policy, p["prompt_ids"], cfg, seed, tokenizer.eos_token_id))})
    return out


def samples_markdown(rows: list[dict], cfg: EvalConfig) -> str:
    quote = lambda text: "\n".join("> " + line for line in (text or "(empty)").splitlines())  # noqa: E731
    parts = [f"# Side-by-side samples\n\npolicy `{cfg.model}` vs its reference; decoding: temperature "
             f"{cfg.temperature}, top_p {cfg.top_p}, max {cfg.max_new_tokens} new tokens, seed {cfg.seed} + i "
             "(the same for both models).\n"]
    for i, r in enumerate(rows, 1):
        parts.append(f"## {i}. pair `{r['pair_id'][:12]}`\n\n**Prompt**\n\n{quote(r['prompt'])}\n\n"
                     f"**Chosen (data)**\n\n{quote(r['chosen'])}\n\n**Reference**\n\n{quote(r['reference'])}\n\n"
                     f"**Policy**\n\n{quote(r['policy'])}\n")
    return "\n".join(parts)


def run(cfg: EvalConfig) -> dict:
    storage.configure(cfg.storage_options_dict)
    refs = load_refs(cfg.refs)
    reference_path = refs.manifest["reference_model"]["path"]
    device = pick_device()
    tokenizer, model = load_policy(resolve_model(cfg.model or reference_path), refs, device)
    model.eval()
    ctx = pass_context(cfg, refs.manifest, tokenizer.pad_token_id or 0, device)
    results = {"model": cfg.model or reference_path, "refs": cfg.refs, "pairs": refs.num_pairs,
               **heldout_metrics(model, refs, ctx), "config": public(cfg)}
    out = output_dir(cfg)
    storage.write_json(storage.join(out, "eval.json"), results)
    if cfg.samples > 0:
        rows = samples(cfg, refs, model, tokenizer, resolve_model(reference_path))
        storage.write_bytes_atomic(storage.join(out, "samples.jsonl"),
                                   "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode())
        storage.write_bytes_atomic(storage.join(out, "samples.md"), samples_markdown(rows, cfg).encode())
    results["output"] = out
    return results


def summary_text(results: dict) -> str:
    return (f"eval: {results['pairs']} held-out pairs, model {results['model']} -> "
            f"{os.path.join(results['output'], 'eval.json')}\n{table(results)}")
