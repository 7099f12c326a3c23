"""`pipeline.py judge`: candidates (generate's output) -> preference pairs that precompute reads.

Every candidate response gets a score from one judge (`stages.core.online.judges`: a reward model or the implicit
reward in Ray actors, a Python function here) or a human label from a sheet; `select_pairs` makes the pairs.
Written to --output:

- `pairs.jsonl`: prompt, chosen, rejected (message lists when the prompts are: precompute's
  conversational rows), their scores and margin, which responses they were;
- `scores.jsonl`: every candidate's score (and how many pairs it is in);
- `rejects.jsonl`: every candidate in no pair, with its reason (empty_response, duplicate_response,
  judge_error, tie, not_selected, single_response; from a sheet also unlabelled, bad_label);
- `manifest.json`: settings, counts (candidates = paired + rejected, always), mean score.

`--export-sheet FILE` instead writes a sheet for people: per prompt two responses, A and B, in a seeded
random order recorded on the sheet; `--labels FILE` reads it back marked A, B or tie (`stages.core.online.sheet`).
"""

from __future__ import annotations

import json
import time

import pyarrow as pa

from stages.core import console, storage
from stages.core.config.engine import ConfigError, public
from stages.core.config.online import JudgeConfig
from stages.core.errors import PipelineError
from stages.core.inputs.candidates import read_candidates
from stages.core.inputs.folders import check_exists
from stages.core.inputs.formats import RowRejected
from stages.core.lease import Lease, check_held
from stages.core.online.candidate_rows import flatten, group_by_prompt, prompt_rng
from stages.core.online.judges import (
    CandidateKey,
    ImplicitRewardJudge,
    RewardModelJudge,
    call_reward_fn,
    candidate_key,
    candidate_prompt,
    check_reward_model,
    load_reward_fn,
    select_pairs,
)
from stages.core.online.outputs import finished
from stages.core.online.sheet import export_sheet, read_labels
from stages.core.runtime.devices import ray_use_gpu, threads_per_worker


class JudgeFailed(PipelineError):
    """The judge scored no candidate: every one it was given failed (judge_error)."""


def _settings(cfg: JudgeConfig, manifest: dict) -> dict:
    judge = cfg.judge
    spec = getattr(cfg, judge)
    if judge == "labels":  # the sheet's content, not its name: a sheet marked further is new input
        check_exists(cfg.labels)
        spec = storage.sha256_bytes(storage.read_bytes(cfg.labels))
    return {"candidates": cfg.candidates, "candidates_files": [f["sha256"] for f in manifest["files"]],
            "judge": judge, "judge_spec": spec, "pairs": cfg.pairs, "min_margin": cfg.min_margin,
            "missing_eos_penalty": cfg.missing_eos_penalty, "seed": cfg.seed, "beta": cfg.beta, "refs": cfg.refs,
            "max_length": cfg.reward_max_tokens}  # the key outputs judged before the rename carry


def _score_with_actors(cfg: JudgeConfig, cands: list[dict], actor,
                       args: dict) -> dict[CandidateKey, tuple[float | None, str]]:
    import ray

    from stages.core.runtime.cluster import actor_pool_map, init_ray, quiet_ray_data

    init_ray(cfg.num_workers + 1)
    quiet_ray_data()
    use_gpu = ray_use_gpu(cfg.device, f"{cfg.num_workers} judge(s)", cfg.num_workers, 1, cfg.gpu_wait_seconds)
    columns = ("prompt_index", "response_index", "prompt", "conversational", "template_json", "response")
    table = pa.Table.from_pylist([{k: c[k] for k in columns} for c in cands])
    ds = actor_pool_map(ray.data.from_arrow(table), actor, batch_size=cfg.batch_size, size=cfg.num_workers,
                        num_gpus=1 if use_gpu else 0, num_cpus=0 if use_gpu else 1,
                        fn_constructor_kwargs={**args, "device": "cuda" if use_gpu else "cpu",
                                               "threads": None if use_gpu else threads_per_worker(cfg.num_workers)})
    out = {}
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        check_held()  # a run that lost its output's lease stops at the next batch
        for r in batch.to_pylist():
            out[candidate_key(r)] = (r["score"], r["error"])
    return out


def _implicit_args(cfg: JudgeConfig) -> dict:
    from stages.core.refs.stream import load_refs
    from stages.core.runtime.models import resolve_model
    from stages.core.training.runs import run_config

    if "://" not in cfg.implicit:  # a local policy checked here: an actor that cannot load it is a Ray traceback
        resolve_model(cfg.implicit)
    refs = load_refs(cfg.refs)
    m = refs.manifest
    beta = cfg.beta if cfg.beta is not None else float(run_config(cfg.implicit).get("beta", 0.1))
    return {"policy_path": cfg.implicit, "reference_path": resolve_model(m.reference_model.path), "beta": beta,
            "truncation": m.truncation, "dtype": cfg.dtype}


def score(cfg: JudgeConfig, cands: list[dict]) -> tuple[dict[str, float], dict[CandidateKey, tuple[str, str]]]:
    """Every usable candidate's score, or its reject (judge_error)."""
    scores: dict[CandidateKey, float] = {}
    rejects: dict[CandidateKey, tuple[str, str]] = {}
    if cfg.judge == "reward_fn":
        fn = load_reward_fn(cfg.reward_fn)
        for c in cands:
            try:
                scores[c["key"]] = call_reward_fn(fn, candidate_prompt(c), c["response"])
            except RowRejected as e:
                rejects[c["key"]] = (e.reason, e.detail)
        return scores, rejects
    if cfg.judge == "reward_model":
        from stages.core.runtime.models import for_workers, resolve_model

        path = resolve_model(cfg.reward_model)
        check_reward_model(path)
        raw = _score_with_actors(cfg, cands, RewardModelJudge, {"model_path": for_workers(cfg.reward_model, path),
                                                            "dtype": cfg.dtype, "max_tokens": cfg.reward_max_tokens})
    else:
        raw = _score_with_actors(cfg, cands, ImplicitRewardJudge, _implicit_args(cfg))
    for key, (value, error) in raw.items():
        if value is None:
            rejects[key] = ("judge_error", error or "no score")
        else:
            scores[key] = value
    return scores, rejects


def _pair_row(rec: dict, chosen: int, rejected: int, scores: dict[int, float]) -> dict:
    prompt = candidate_prompt(rec)
    answer = (lambda t: [{"role": "assistant", "content": t}]) if rec["conversational"] else (lambda t: t)
    row = {"prompt": prompt, "chosen": answer(rec["responses"][chosen]), "rejected": answer(rec["responses"][rejected]),
           "chosen_score": scores.get(chosen), "rejected_score": scores.get(rejected),
           "margin": None if chosen not in scores else scores[chosen] - scores[rejected],
           "prompt_index": rec["prompt_index"], "prompt_id": rec["prompt_id"], "chosen_index": chosen,
           "rejected_index": rejected}
    if rec["template_json"]:
        row.update(json.loads(rec["template_json"]))
    return row


def make_pairs(cfg: JudgeConfig, rows: list[dict], cands: list[dict], scores: dict[CandidateKey, float],
               rejects: dict[CandidateKey, tuple[str, str]],
               pairs_of: dict | None) -> tuple[list[dict], dict[CandidateKey, int]]:
    """Pair rows, and how many pairs each candidate is in. Scores go through `select_pairs` (its rejects
    are added to `rejects`); a sheet's labels (`pairs_of`) are the pairs as they are."""
    pairs, in_pairs, by_prompt = [], {}, group_by_prompt(cands)
    for rec in rows:
        i = rec["prompt_index"]
        if pairs_of is None:
            usable = {c["response_index"]: scores[c["key"]] for c in by_prompt.get(i, [])
                      if c["key"] in scores and c["key"] not in rejects}
            chosen_pairs, left = select_pairs(usable, cfg.pairs, cfg.min_margin, prompt_rng(cfg.seed, rec))
            for j, (reason, detail) in left.items():
                rejects[(i, j)] = (reason, detail)
            local = usable
        else:
            chosen_pairs = pairs_of.get(i, [])
            local = {j: scores[(i, j)] for j in range(len(rec["responses"])) if (i, j) in scores}
        for a, b in chosen_pairs:
            pairs.append(_pair_row(rec, a, b, local))
            for j in (a, b):
                in_pairs[(i, j)] = in_pairs.get((i, j), 0) + 1
    return pairs, in_pairs


def run(cfg: JudgeConfig) -> dict:
    storage.configure(cfg.storage_options_dict)
    if cfg.judge == "sheet" and not cfg.export_sheet:
        raise ConfigError("judge: give one of --reward-model, --reward-fn, --labels, --implicit (or --export-sheet)")
    manifest, rows = read_candidates(cfg.candidates)
    if cfg.export_sheet:
        return export_sheet(cfg, rows)
    settings = _settings(cfg, manifest)
    done = finished(cfg.output, settings, cfg.overwrite, holds="pairs")
    if done is not None:
        console.say("judge", f"{cfg.output} already holds these pairs ({done['counts']['pairs']}): not judged again")
        return {**done, "skipped": True}
    with Lease(cfg.output, "judge"):
        return _judge(cfg, manifest, rows, settings)


def _judge(cfg: JudgeConfig, manifest: dict, rows: list[dict], settings: dict) -> dict:
    started = time.time()
    cands, rejects = flatten(rows)
    by_key = {c["key"]: c for c in cands}
    if cfg.labels:
        pairs_of, label_rejects, scores = read_labels(cfg.labels, rows, set(by_key))
        rejects.update(label_rejects)
    else:
        scores, judge_rejects = score(cfg, cands)
        rejects.update(judge_rejects)
        for key, c in by_key.items():  # TRL online DPO's missing_eos_penalty: a response cut short scores less
            if key in scores and c["finish_reason"] == "length":
                scores[key] -= cfg.missing_eos_penalty
        pairs_of = None
    pairs, in_pairs = make_pairs(cfg, rows, cands, scores, rejects, pairs_of)
    all_keys = [(rec["prompt_index"], j) for rec in rows for j in range(len(rec["responses"]))]
    for key in all_keys:  # a candidate neither paired nor given a reason would be lost: there is none
        if key not in in_pairs and key not in rejects:
            rejects[key] = ("not_selected", "not paired")
    rejects = {k: v for k, v in rejects.items() if k not in in_pairs}
    finish_of = {(rec["prompt_index"], j): r for rec in rows for j, r in enumerate(rec["finish_reasons"])}
    score_rows = [{"prompt_index": i, "response_index": j, "score": scores.get((i, j)),
                   "finish_reason": finish_of[(i, j)], "in_pairs": in_pairs.get((i, j), 0)} for i, j in all_keys]
    reject_rows = [{"prompt_index": i, "response_index": j, "reason": r, "detail": d, "score": scores.get((i, j))}
                   for (i, j), (r, d) in rejects.items()]
    reject_rows.sort(key=lambda r: (r["prompt_index"], r["response_index"]))
    _clear(cfg.output)  # only now: a judge that cannot start leaves an earlier output as it was
    _write_jsonl(storage.join(cfg.output, "scores.jsonl"), score_rows)
    _write_jsonl(storage.join(cfg.output, "rejects.jsonl"), reject_rows)
    errors = judge_errors(reject_rows)
    if errors and not scores:  # written first: every candidate's reason is kept
        raise JudgeFailed(failure(errors, reject_rows, cfg.output))
    _write_jsonl(storage.join(cfg.output, "pairs.jsonl"), pairs)
    judged = [s["score"] for s in score_rows if s["score"] is not None]
    by_reason: dict[str, int] = {}
    for r in reject_rows:
        by_reason[r["reason"]] = by_reason.get(r["reason"], 0) + 1
    counts = {"prompts": len(rows), "candidates": len(all_keys), "pairs": len(pairs),
              "candidates_paired": len(in_pairs), "candidates_rejected": len(reject_rows),
              "prompts_with_pairs": len({p["prompt_index"] for p in pairs})}
    if counts["candidates"] != counts["candidates_paired"] + counts["candidates_rejected"]:
        raise RuntimeError(f"judge lost candidates: {counts}")  # a bug, never an input problem
    out = {"format_version": 1, "kind": "pairs", "settings": settings, "judge": cfg.judge, "counts": counts,
           "rejects_by_reason": dict(sorted(by_reason.items())), "judge_errors": errors,
           "mean_score": sum(judged) / len(judged) if judged else None, "scored": len(judged),
           "mean_margin": (sum(p["margin"] for p in pairs if p["margin"] is not None) / len(pairs)) if pairs else None,
           "generator": manifest["model"], "elapsed_s": round(time.time() - started, 2), "config": public(cfg)}
    storage.write_json(storage.join(cfg.output, "manifest.json"), out)
    return out


def _clear(output: str) -> None:
    """A manifest from an earlier run (other settings, --overwrite) must not call this run's files finished,
    nor its pairs outlive a run that makes none."""
    for name in ("manifest.json", "pairs.jsonl"):
        if storage.exists(storage.join(output, name)):
            storage.remove(storage.join(output, name))


def judge_errors(reject_rows: list[dict]) -> dict | None:
    """How many candidates the judge failed on (judge_error), and the first of them; None when none."""
    failed = [r for r in reject_rows if r["reason"] == "judge_error"]
    if not failed:
        return None
    first = failed[0]
    return {"count": len(failed), "first": {k: first[k] for k in ("prompt_index", "response_index", "detail")}}


def first_error_text(errors: dict) -> str:
    first = errors["first"]
    return f"{first['detail']} (prompt {first['prompt_index']}, response {first['response_index']})"


def failure(errors: dict, reject_rows: list[dict], output: str) -> str:
    """The message of a judge that scored no candidate: its first failure, and how many failed alike."""
    n, detail = errors["count"], errors["first"]["detail"]
    alike = sum(r["reason"] == "judge_error" and r["detail"] == detail for r in reject_rows)
    others = len(reject_rows) - n  # empty or duplicate responses, never given to the judge
    return (f"judge: every one of {n} answers failed: judge_error x{n}; first: {first_error_text(errors)}"
            + ("" if alike == n else f"; {alike} of {n} failed alike")
            + (f" ({others} more candidates were not judged: empty or duplicate)" if others else "")
            + f". Nothing was paired; every candidate's reason is in {output}/rejects.jsonl")


def _write_jsonl(url: str, rows: list[dict]) -> None:
    storage.write_bytes_atomic(url, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode())


def summary(result: dict, cfg: JudgeConfig) -> str:
    if "sheet" in result:
        return (f"judge: sheet of {result['rows']} rows ({result['prompts']} prompts) -> {result['sheet']}; mark "
                f"label A, B or tie, then: pipeline.py judge --candidates {cfg.candidates} --labels {result['sheet']}")
    c = result["counts"]
    if result.get("skipped"):
        return f"judge: {cfg.output} kept ({c['pairs']} pairs)"
    reasons = ", ".join(f"{k} {v}" for k, v in result["rejects_by_reason"].items()) or "none"
    mean = "" if result["mean_score"] is None else f", mean score {result['mean_score']:.4f}"
    errors = result.get("judge_errors")
    return (f"judge ({result['judge']}): {c['candidates']} candidates of {c['prompts']} prompts -> {c['pairs']} pairs "
            f"({c['candidates_paired']} candidates paired, {c['candidates_rejected']} rejected: {reasons}){mean} "
            f"-> {cfg.output}/pairs.jsonl" + (f"; first judge error: {first_error_text(errors)}" if errors else ""))
