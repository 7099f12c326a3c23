"""`pipeline.py eval`: score a held-out set with a policy against the shards' reference log-probs.

Reports preference accuracy of the implicit reward, mean margin, chosen / rejected rewards and the
mean log-ratio log(pi/pi_ref) of the data's chosen and rejected answers (per sequence and per
token), beside the same figures for the reference itself (the baseline: accuracy 0, margin 0), as
eval.json and a table. The loss and beta are the run's own (its train_config.yaml) unless given.
With --samples N it also generates answers from the reference and the policy for N held-out
prompts, with the same seeded decoding, next to the data's chosen answer (samples.md,
samples.jsonl), and estimates KL(policy || reference) from one pure sample of the policy per
prompt (temperature 1, no top-p: the estimator needs samples of the policy itself). The held-out set is
streamed from its shards: one micro-batch of pairs is in memory at a time, whatever its size.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re

import torch

from stages.core import console, storage
from stages.core.config.engine import public
from stages.core.config.options import EvalConfig
from stages.core.lease import Lease
from stages.core.refs.stream import Refs, check_tokenizer, epoch_pairs, load_refs
from stages.core.runtime.devices import pick_device
from stages.core.runtime.models import load_model, load_tokenizer, resolve_model, tokenizer_hashes
from stages.core.scoring.logprobs import sequence_logps
from stages.core.scoring.packing import pad_batch
from stages.core.training.checkpoint import load_policy_model
from stages.core.training.policy_pass import heldout_metrics, pass_context, reference_metrics
from stages.core.training.runs import run_config

ROWS = [("preference accuracy", "eval/rewards/accuracies"), ("mean margin", "eval/rewards/margins"),
        ("reward chosen", "eval/rewards/chosen"), ("reward rejected", "eval/rewards/rejected"),
        ("log-ratio chosen (per seq)", "eval/logratio/chosen"),
        ("log-ratio rejected (per seq)", "eval/logratio/rejected"),
        ("log-ratio chosen (per token)", "eval/logratio_per_token/chosen"),
        ("log-ratio rejected (per token)", "eval/logratio_per_token/rejected"),
        ("KL(policy || reference), sampled (per seq)", "eval/kl_sampled"),
        ("KL(policy || reference), sampled (per token)", "eval/kl_sampled_per_token"),
        ("KL estimate, mismatched completions (KTO)", "eval/kl"),
        ("desirable examples", "eval/count/desirable"), ("undesirable examples", "eval/count/undesirable"),
        ("loss", "eval/loss")]
# The loss settings a run trained with; eval scores its loss with them unless told otherwise.
LOSS_KEYS = ("loss_type", "loss_weights", "label_smoothing", "discopop_tau", "simpo_gamma", "desirable_weight",
             "undesirable_weight")


def output_dir(cfg: EvalConfig) -> str:
    if cfg.output:
        return cfg.output
    return storage.join(cfg.model, "eval") if cfg.model else "runs/eval"


# KTO's figures keep TRL's keys (chosen: desirable examples, rejected: undesirable ones); the table says which.
UNPAIRED_NAMES = {"eval/rewards/chosen": "reward desirable", "eval/rewards/rejected": "reward undesirable",
                  "eval/rewards/margins": "mean margin (desirable - undesirable)"}


def _cell(value: float, key: str) -> str:
    return f"{value:.0f}" if key.startswith("eval/count/") else f"{value:.4f}"


def table(results: dict) -> str:
    """Policy beside reference, one row per metric (the sampled KL has no reference column: it is 0)."""
    base = results.get("reference", {})
    names = UNPAIRED_NAMES if results.get("kind") == "unpaired" else {}
    lines = ["| metric | reference | policy |", "|---|---:|---:|"]
    lines += [f"| {names.get(key, name)} | {_cell(base[key], key) if key in base else ''} | "
              f"{_cell(results[key], key)} |" for name, key in ROWS if key in results]
    return "\n".join(lines)


def with_run_settings(cfg: EvalConfig, kind: str = "paired") -> tuple[EvalConfig, str | None]:
    """Fill an unset --loss-type / --beta from the run's train_config.yaml (the loss's own parameters
    come with its type), else sigmoid (kto for unpaired shards, `kind`) / 0.1; returns the config and
    where the values came from."""
    run = run_config(cfg.model)
    values: dict = {}
    if cfg.loss_type is None:
        values.update({k: run[k] for k in LOSS_KEYS if k in run})
        values.setdefault("loss_type", "kto" if kind == "unpaired" else "sigmoid")
    if cfg.beta is None:
        values["beta"] = float(run.get("beta", 0.1))
    used_run = any(k in run for k in values)
    return dataclasses.replace(cfg, **values), (run.get("_source") if used_run else None)


# Chat templates' turn markers, as decoded with special tokens: role, then content up to the turn's end.
TURN_PATTERNS = (
    re.compile(r"<\|im_start\|>(\w+)\n(.*?)(?:<\|im_end\|>|$)", re.S),  # ChatML (SmolLM2, Qwen)
    re.compile(r"<\|start_header_id\|>(\w+)<\|end_header_id\|>\n\n(.*?)(?:<\|eot_id\|>|$)", re.S),  # Llama 3
    re.compile(r"<start_of_turn>(\w+)\n(.*?)(?:<end_of_turn>|$)", re.S),  # Gemma
)


def prompt_turns(tokenizer, prompt_ids: list[int]) -> list[dict] | None:
    """A conversational prompt's turns ({"role", "content"}), read from its chat template's markers;
    None for a plain-text prompt or a template of another family. The empty last turn is the
    generation prompt (the answer's role): left out."""
    text = tokenizer.decode(prompt_ids, skip_special_tokens=False)
    for pattern in TURN_PATTERNS:
        turns = [{"role": role, "content": content.strip()} for role, content in pattern.findall(text)]
        if turns:
            return turns[:-1] if not turns[-1]["content"] else turns
    return None


def _generate(model, prompt_ids: list[int], cfg: EvalConfig, seed: int, eos_id: int) -> list[int]:
    torch.manual_seed(seed)
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=model.device)
    sample = cfg.temperature > 0
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=cfg.max_new_tokens,
                         do_sample=sample, temperature=cfg.temperature if sample else None,
                         top_p=cfg.top_p if sample else None, pad_token_id=eos_id, eos_token_id=eos_id)
    return out[0, len(prompt_ids):].tolist()


def _logp(model, prompt_ids: list[int], completion: list[int]) -> float:
    """Summed log-prob of `completion` after `prompt_ids` (THE log-prob function, one sequence)."""
    ids, mask, comp = pad_batch([list(prompt_ids) + completion], [len(prompt_ids)], 0, model.device)
    return float(sequence_logps(model, ids, mask, comp)[0])


def samples(cfg: EvalConfig, refs: Refs, policy, tokenizer, reference_path: str) -> tuple[list[dict], dict]:
    """Answers from the reference and the policy for the first N held-out prompts (fixed order), and
    KL(policy || reference) estimated as the mean of log pi(y) - log pi_ref(y) over one pure policy
    sample y per prompt."""
    pairs = list(itertools.islice(epoch_pairs(refs, 0, 0, 1), cfg.samples))
    reference = load_model(reference_path, str(policy.dtype).replace("torch.", ""), str(policy.device)).eval()
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True).strip()  # noqa: E731
    pure = dataclasses.replace(cfg, temperature=1.0, top_p=1.0)
    out, kl, tokens = [], 0.0, 0
    with torch.no_grad():
        for i, p in enumerate(pairs):
            seed = cfg.seed + i  # the same draw for both models
            out.append({"pair_id": p["pair_id"], "prompt": decode(p["prompt_ids"]), "chosen": decode(p["chosen_ids"]),
                        "reference": decode(_generate(reference, p["prompt_ids"], cfg, seed, tokenizer.eos_token_id)),
                        "policy": decode(_generate(policy, p["prompt_ids"], cfg, seed, tokenizer.eos_token_id)),
                        **_sample_extras(tokenizer, p)})
            y = _generate(policy, p["prompt_ids"], pure, seed, tokenizer.eos_token_id)
            kl += _logp(policy, p["prompt_ids"], y) - _logp(reference, p["prompt_ids"], y)
            tokens += len(y)
    n = max(len(pairs), 1)
    return out, {"eval/kl_sampled": kl / n, "eval/kl_sampled_per_token": kl / max(tokens, 1), "kl_samples": len(pairs)}


def _sample_extras(tokenizer, p: dict) -> dict:
    """A sample's prompt turns (conversational prompts) and, for an unpaired example, its label."""
    extras = {}
    turns = prompt_turns(tokenizer, p["prompt_ids"])
    if turns:
        extras["turns"] = turns
    if "label" in p:
        extras["label"] = bool(p["label"])
    return extras


def _quote(text: str) -> str:
    return "\n".join("> " + line for line in (text or "(empty)").splitlines())


def _prompt_markdown(row: dict) -> str:
    """The prompt as a quote: one paragraph per turn, led by its role in bold, or the plain text."""
    if not row.get("turns"):
        return _quote(row["prompt"])
    return "\n>\n".join(_quote(f"**{t['role']}:** {t['content']}") for t in row["turns"])


def _data_heading(row: dict) -> str:
    """The data's answer: a pair's chosen one, or an unpaired example's completion with its label."""
    if "label" not in row:
        return "Chosen (data)"
    return f"Completion (data, {'desirable' if row['label'] else 'undesirable'})"


def samples_markdown(rows: list[dict], cfg: EvalConfig) -> str:
    parts = [f"# Side-by-side samples\n\npolicy `{cfg.model}` vs its reference; decoding: temperature "
             f"{cfg.temperature}, top_p {cfg.top_p}, max {cfg.max_new_tokens} new tokens, seed {cfg.seed} + i "
             "(the same for both models).\n"]
    for i, r in enumerate(rows, 1):
        what = "example" if "label" in r else "pair"
        parts.append(f"## {i}. {what} `{r['pair_id'][:12]}`\n\n**Prompt**\n\n{_prompt_markdown(r)}\n\n"
                     f"**{_data_heading(r)}**\n\n{_quote(r['chosen'])}\n\n**Reference**\n\n"
                     f"{_quote(r['reference'])}\n\n**Policy**\n\n{_quote(r['policy'])}\n")
    return "\n".join(parts)


def run(cfg: EvalConfig) -> dict:
    storage.configure(cfg.storage_options_dict)
    refs = load_refs(cfg.refs)
    cfg, loss_source = with_run_settings(cfg, refs.kind)
    out = output_dir(cfg)
    with Lease(out, "eval") as lease:  # one evaluation at a time writes a folder; checked per micro-batch
        results = _run(cfg, refs, loss_source, out)
        lease.check(read=True)  # a run that lost its lease while it ran leaves the folder to the new holder
        storage.write_json(storage.join(out, "eval.json"), results)
    results["output"] = out
    return results


def _run(cfg: EvalConfig, refs, loss_source: str | None, out: str) -> dict:
    reference_path = refs.manifest.reference_model.path
    device = pick_device(cfg.device, "evaluation")
    policy_path = resolve_model(cfg.model or reference_path)
    tokenizer = load_tokenizer(policy_path)
    check_tokenizer(refs, tokenizer_hashes(tokenizer))
    # Loading, scoring and sampling each take a while on a CPU with a real model: say which is running.
    _say(cfg, f"loading the policy {policy_path} ({device})")
    model = load_policy_model(policy_path, device).eval()  # final/, best/, final/adapter/ or checkpoints/step-N
    # Every streamed row is checked against the manifest, token ids against this policy's vocabulary.
    refs = dataclasses.replace(refs, vocab_size=model.get_input_embeddings().num_embeddings)
    ctx = pass_context(cfg, refs.manifest, tokenizer.pad_token_id or 0, device)
    _say(cfg, f"scoring {refs.num_pairs} held-out {'examples' if refs.kind == 'unpaired' else 'pairs'}")
    results = {"model": cfg.model or reference_path, "refs": cfg.refs, "pairs": refs.num_pairs, "kind": refs.kind,
               "loss_settings_from": loss_source or "eval flags / defaults", **heldout_metrics(model, refs, ctx),
               "reference": reference_metrics(refs, ctx), "config": public(cfg)}
    if cfg.samples > 0:
        _say(cfg, f"sampling {cfg.samples} prompt(s) from the reference and the policy "
                  f"(up to {cfg.max_new_tokens} new tokens each)")
        rows, kl = samples(cfg, refs, model, tokenizer, resolve_model(reference_path))
        results.update(kl)
        storage.write_bytes_atomic(storage.join(out, "samples.jsonl"),
                                   "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode())
        storage.write_bytes_atomic(storage.join(out, "samples.md"), samples_markdown(rows, cfg).encode())
    return results


def _say(cfg: EvalConfig, message: str) -> None:
    if cfg.progress:
        console.say("eval", message)


def run_on_its_device(cfg: EvalConfig) -> dict:
    """`run` where its device is: here, or, for --device cuda in a driver without a GPU (a Ray job's
    driver on a CPU head node: the nightly chain, on-policy rounds), in a Ray task that asks for one."""
    import torch

    if cfg.device != "cuda" or torch.cuda.is_available():
        return run(cfg)
    import ray

    from stages.core.runtime.cluster import init_ray
    from stages.core.runtime.devices import wait_for_gpus

    init_ray(1)
    wait_for_gpus("evaluation", 1, 1, cfg.gpu_wait_seconds)
    return ray.get(ray.remote(num_gpus=1, num_cpus=1)(run).remote(cfg))


def summary_text(results: dict) -> str:
    what = "examples" if results.get("kind") == "unpaired" else "pairs"  # `pairs` counts either
    return (f"eval: {results['pairs']} held-out {what}, model {results['model']} -> "
            f"{os.path.join(results['output'], 'eval.json')} (loss settings: {results['loss_settings_from']})\n"
            f"{table(results)}")
