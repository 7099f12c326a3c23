"""`pipeline.py generate`: N sampled responses per prompt, from a Ray Data pool of sampler actors.

prompts (any input precompute reads, prompt-only rows, or a plain list) -> the driver reads the prompts
(one small row each: prompt sets are far smaller than preference sets) -> sampler actors, one per GPU
or CPU worker, each call a batch of `batch_size` prompts x `num_samples` rows, left-padded -> Parquet
files `candidates-NNNNN.parquet` of `rows_per_file` prompts, in input order, written as they complete
-> `manifest.json` last (model and weights hash, sampling settings, seed, counts, throughput).

A finished output (its manifest) with the same settings is not generated again: the command says so and
returns; other settings are refused unless --overwrite. The same command with the same seed gives the
same samples (`stages.core.online.sampling`).
"""

from __future__ import annotations

import json
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq

from stages.core import console, storage
from stages.core.config.engine import ConfigError, public
from stages.core.config.online import GenerateConfig
from stages.core.inputs.files import MalformedRow
from stages.core.inputs.prompts import prompt_id, read_prompts
from stages.core.lease import Lease, check_held
from stages.core.online.outputs import finished
from stages.core.online.sampling import CANDIDATE_SCHEMA, Sampler
from stages.core.runtime.cluster import actor_pool_map, init_ray, quiet_ray_data
from stages.core.runtime.devices import ray_use_gpu, threads_per_worker
from stages.core.runtime.models import for_workers, load_tokenizer, resolve_model, tokenizer_hashes, weights_hash

FORMAT_VERSION = 1
SETTINGS = ("prompts", "format", "prompt_column", "split", "limit", "num_samples", "temperature", "top_p",
            "max_new_tokens", "seed", "dtype")


def _engine(cfg: GenerateConfig, use_gpu: bool) -> str:
    import importlib.util

    has_vllm = importlib.util.find_spec("vllm") is not None
    if cfg.engine == "vllm" and not (has_vllm and use_gpu):
        raise ConfigError("config key 'engine': vllm needs the vllm package and a GPU "
                          f"({'no vllm' if not has_vllm else 'no GPU for the samplers'}); use --engine hf")
    return "vllm" if cfg.engine == "vllm" or (cfg.engine == "auto" and has_vllm and use_gpu) else "hf"


def settings_of(cfg: GenerateConfig, model_path: str) -> dict:
    tok = load_tokenizer(model_path)
    return {**{k: getattr(cfg, k) for k in SETTINGS}, "model": cfg.model, "weights_hash": weights_hash(model_path),
            **tokenizer_hashes(tok)}


def _clear(output: str) -> None:
    for name in storage.list_names(output):
        if name.startswith("candidates-") or name in ("rejects.jsonl", "manifest.json"):
            storage.remove(storage.join(output, name))


def _reject(index: int, reason: str, detail: str, raw) -> dict:
    row = raw.text if isinstance(raw, MalformedRow) else raw
    return {"source_index": index, "reason": reason, "detail": detail, "row": row}


def run(cfg: GenerateConfig) -> dict:
    """Generate; returns the manifest (with `skipped`: True when a finished output was kept)."""
    started = time.time()
    storage.configure(cfg.storage_options_dict)
    model_path = resolve_model(cfg.model)
    settings = settings_of(cfg, model_path)
    done = finished(cfg.output, settings, cfg.overwrite)
    if done is not None:
        console.say("generate", f"{cfg.output} already holds these samples ({done['counts']['samples']} from "
                    f"{done['counts']['prompts']} prompts): not generated again")
        return {**done, "skipped": True}
    # Read before the output is touched: prompts that cannot be used leave an earlier output (--overwrite)
    # as it was, and make no folder.
    items, rejects, rows_read = _read(cfg)
    with Lease(cfg.output, "generate"):
        _clear(cfg.output)
        return _generate(cfg, model_path, settings, items, rejects, rows_read, started)


def _read(cfg: GenerateConfig) -> tuple[list[dict], list[dict], int]:
    """(prompts to sample, rejects, rows read); a ConfigError when no prompt can be used."""
    items, rejects, rows_read = [], [], 0
    for index, prompt, template, error, raw in read_prompts(cfg.prompts, cfg.format, cfg.prompt_column, cfg.split,
                                                            cfg.limit, cfg.storage_options_dict):
        rows_read += 1
        if error is not None:
            rejects.append(_reject(index, error.reason, error.detail, raw))
            continue
        conversational = isinstance(prompt, list)
        items.append({"prompt_index": index, "prompt_id": prompt_id(prompt, template),
                      "prompt": json.dumps(prompt, ensure_ascii=False) if conversational else prompt,
                      "conversational": conversational,
                      "template_json": json.dumps(template, ensure_ascii=False) if template else None})
    if not rows_read:
        raise ConfigError(f"--prompts {cfg.prompts} holds no rows")
    if not items:
        reasons = ", ".join(f"{k} {v}" for k, v in _by_reason(rejects).items())
        raise ConfigError(f"--prompts {cfg.prompts}: none of its {rows_read} row{'s' * (rows_read != 1)} holds a "
                          f"usable prompt ({reasons}); the first: {rejects[0]['detail']}")
    return items, rejects, rows_read


def _generate(cfg: GenerateConfig, model_path: str, settings: dict, items: list[dict], rejects: list[dict],
              rows_read: int, started: float) -> dict:
    import ray

    init_ray(cfg.num_workers + 1)
    quiet_ray_data()
    use_gpu = ray_use_gpu(cfg.device, f"{cfg.num_workers} sampler(s)", cfg.num_workers, 1, cfg.gpu_wait_seconds)
    engine = _engine(cfg, use_gpu)
    ctx = ray.data.DataContext.get_current()
    kept_order = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True  # the same batches, so the same padding, on every run
    try:
        return _sample(cfg, items, rejects, rows_read, started, model_path, settings, use_gpu, engine)
    finally:
        ctx.execution_options.preserve_order = kept_order


def _sample(cfg: GenerateConfig, items: list[dict], rejects: list[dict], rows_read: int, started: float,
            model_path: str, settings: dict, use_gpu: bool, engine: str) -> dict:
    """The sampler pool over the prompts; candidate files written as they complete, then the manifest."""
    import ray

    sampling = {k: getattr(cfg, k) for k in ("num_samples", "temperature", "top_p", "max_new_tokens", "seed")}
    ds = ray.data.from_arrow(pa.Table.from_pylist(items, schema=pa.schema(
        [CANDIDATE_SCHEMA.field(n) for n in ("prompt_index", "prompt_id", "prompt", "conversational",
                                             "template_json")])))
    ds = actor_pool_map(ds, Sampler, batch_size=cfg.batch_size, size=cfg.num_workers,
                        num_gpus=1 if use_gpu else 0, num_cpus=0 if use_gpu else 1,
                        fn_constructor_kwargs={"model_path": for_workers(cfg.model, model_path), "dtype": cfg.dtype,
                                               "sampling": sampling,
                                               "device": "cuda" if use_gpu else "cpu", "engine": engine,
                                               "threads": None if use_gpu else threads_per_worker(cfg.num_workers)})
    files, buffer, counts = [], [], {"samples": 0, "stop": 0, "length": 0, "prompt_tokens": 0, "response_tokens": 0}
    bar = _bar(cfg, len(items))
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        check_held()  # a run that lost its output's lease stops at the next batch
        for rec in batch.to_pylist():
            if rec["reject_reason"]:
                rejects.append(_reject(rec["prompt_index"], rec["reject_reason"], rec["reject_detail"],
                                       rec["prompt"]))
            else:
                buffer.append(rec)
                counts["samples"] += len(rec["responses"])
                counts["prompt_tokens"] += rec["prompt_tokens"]
                counts["response_tokens"] += sum(rec["response_tokens"])
                for reason in rec["finish_reasons"]:
                    counts[reason] += 1
            if len(buffer) >= cfg.rows_per_file:
                files.append(_write(cfg.output, len(files), buffer))
                buffer = []
        if bar is not None:
            bar.update(batch.num_rows)
            bar.set_postfix_str(f"{counts['response_tokens'] / max(time.time() - started, 1e-9):.1f} tokens/s")
    if buffer:
        files.append(_write(cfg.output, len(files), buffer))
    if bar is not None:
        bar.close()
    rejects.sort(key=lambda r: r["source_index"])
    storage.write_bytes_atomic(storage.join(cfg.output, "rejects.jsonl"), "".join(
        json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rejects).encode())
    elapsed = time.time() - started
    prompts = sum(f["rows"] for f in files)
    manifest = {
        "format_version": FORMAT_VERSION, "kind": "candidates", "model": {"name": cfg.model, "path": model_path},
        "settings": settings, "engine": engine,
        "counts": {"rows_read": rows_read, "prompts": prompts, "prompts_rejected": len(rejects),
                   "samples": counts["samples"], "finish_reasons": {"stop": counts["stop"], "length": counts["length"]},
                   "prompt_tokens": counts["prompt_tokens"], "response_tokens": counts["response_tokens"]},
        "rejects_by_reason": _by_reason(rejects), "files": files, "elapsed_s": round(elapsed, 2),
        "prompts_per_s": round(prompts / elapsed, 3), "tokens_per_s": round(counts["response_tokens"] / elapsed, 2),
        "config": public(cfg)}
    assert rows_read == prompts + len(rejects), (rows_read, prompts, len(rejects))
    storage.write_json(storage.join(cfg.output, "manifest.json"), manifest)
    return manifest


def _by_reason(rejects: list[dict]) -> dict:
    out: dict[str, int] = {}
    for r in rejects:
        out[r["reason"]] = out.get(r["reason"], 0) + 1
    return dict(sorted(out.items()))


def _bar(cfg: GenerateConfig, total: int):
    if not cfg.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="prompt", desc="generate", file=sys.stderr, dynamic_ncols=True)


def _write(output: str, k: int, rows: list[dict]) -> dict:
    name = f"candidates-{k:05d}.parquet"
    table = pa.Table.from_pylist(rows, schema=CANDIDATE_SCHEMA)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    data = sink.getvalue().to_pybytes()
    storage.write_bytes_atomic(storage.join(output, name), data)
    return {"name": name, "rows": len(rows), "first_prompt_index": rows[0]["prompt_index"],
            "sha256": storage.sha256_bytes(data)}


def summary(manifest: dict, output: str) -> str:
    c = manifest["counts"]
    if manifest.get("skipped"):
        return f"generate: {output} kept ({c['samples']} samples of {c['prompts']} prompts)"
    return (f"generate: {c['prompts']} prompts x {manifest['settings']['num_samples']} -> {c['samples']} samples "
            f"({c['finish_reasons']['stop']} stopped, {c['finish_reasons']['length']} at max_new_tokens), "
            f"{c['prompts_rejected']} prompts rejected, {manifest['prompts_per_s']} prompts/s, "
            f"{manifest['tokens_per_s']} tokens/s ({manifest['engine']}) -> {output}")
