"""Streaming DPO trainer: the policy alone in memory, reference log-probs read from the shards.

One `train_loop` serves a single process and each Ray Train worker. Every worker streams the
same global order of pairs and takes its slice of each optimizer batch (pairs i with
i % world == rank); gradients are summed over workers, so N workers reproduce one worker's
updates with the same global `batch_size`. No reference model is ever loaded.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import sys
import time

import torch

from stages import checkpoint, shards, storage
from stages.config import TrainConfig, to_yaml
from stages.losses import LossParams, parse_loss_types
from stages.metrics import MetricsLog, plot, read
from stages.policy_pass import SUM_KEYS, evaluate, means, run_pairs
from stages.ray_runtime import init_ray


class TrainingError(RuntimeError):
    """A run that cannot go on: non-finite loss, nothing to resume, a mismatched output."""


def output_dir(cfg: TrainConfig) -> str:
    return cfg.output or storage.join(cfg.refs, "policy")


def _publish(stage: str, out: str, names: tuple[str, ...]) -> None:
    """Upload run files from the staging folder (a no-op for a local OUTPUT)."""
    for name in names:
        local = os.path.join(stage, name)
        if os.path.exists(local):
            storage.upload(local, storage.join(out, name))


def total_steps(cfg: TrainConfig, num_pairs: int) -> int:
    return cfg.max_steps or cfg.epochs * math.ceil(num_pairs / cfg.batch_size)


class _Dist:
    """rank / world and the two collectives the loop needs; a no-op in a single process."""

    def __init__(self):
        import torch.distributed as dist

        self.on = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.on else 0
        self.world = dist.get_world_size() if self.on else 1

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.on:
            import torch.distributed as dist

            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def sum_grads(self, params: list[torch.nn.Parameter]) -> None:
        """One flat all-reduce of all gradients (missing ones count as zero)."""
        if not self.on:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = self.sum_(torch.cat([g.reshape(-1) for g in grads]))
        offset = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[offset:offset + n].view_as(p).clone()
            offset += n


def _setup(cfg: TrainConfig, refs: shards.Refs, device: str):
    from transformers import get_scheduler

    from stages.models import load_model, load_tokenizer, resolve_model, tokenizer_hashes

    model_path = resolve_model(cfg.model or refs.manifest["reference_model"]["path"])
    tokenizer = load_tokenizer(model_path)
    shards.check_tokenizer(refs, tokenizer_hashes(tokenizer))
    model = load_model(model_path, "float32", device)  # float32 master weights; bf16 is autocast
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    model.train()
    # fused: one kernel over all parameters, without the foreach path's temporary copies of them
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay, fused=True)
    steps = total_steps(cfg, refs.num_pairs)
    scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=int(cfg.warmup_ratio * steps),
                              num_training_steps=steps)
    return model_path, tokenizer, model, optimizer, scheduler, steps


def train_loop(cfg: TrainConfig) -> dict:
    """Train; returns the summary. Runs as is in one process or inside a Ray Train worker."""
    storage.configure(cfg.storage_options)
    dist = _Dist()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and dist.on:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    out = output_dir(cfg)
    stage = storage.staging_dir(out)  # local files first; uploaded at checkpoints and at the end
    refs = shards.load_refs(cfg.refs)
    eval_refs = shards.load_refs(cfg.eval_refs) if cfg.eval_refs else None
    model_path, tokenizer, model, optimizer, scheduler, steps = _setup(cfg, refs, device)
    reference = refs.manifest["reference_model"]["path"]
    if dist.rank == 0 and os.path.realpath(model_path) != os.path.realpath(reference):
        print(f"note: policy starts from {model_path}, the shards' reference is {reference}", file=sys.stderr)

    step, epoch, skip, resume_step = 0, 0, 0, None
    stopper = EarlyStopping(cfg.early_stopping_metric, cfg.early_stopping_patience)
    last = checkpoint.latest(out) if cfg.resume != "false" else None
    if cfg.resume == "true" and last is None:
        raise TrainingError(f"--resume: no checkpoint under {out}/checkpoints (run with --save-every N first)")
    if last is not None:
        state = checkpoint.load(last, stage, model, optimizer, scheduler)
        step, epoch, skip, resume_step = state["step"], state["epoch"], state["consumed"], state["step"]
        stopper.restore(state.get("early_stopping"))
        if dist.rank == 0 and storage.exists(storage.join(out, "metrics.jsonl")):
            storage.download(storage.join(out, "metrics.jsonl"), os.path.join(stage, "metrics.jsonl"))
    elif (dist.rank == 0 and cfg.resume != "auto" and not cfg.overwrite
          and storage.exists(storage.join(out, "metrics.jsonl"))):
        raise TrainingError(f"{out} already holds a run: pass --resume to continue it or --overwrite to start over")

    log = MetricsLog(stage, resume_step) if dist.rank == 0 else None
    if dist.rank == 0:
        storage.write_bytes_atomic(storage.join(out, "train_config.yaml"), to_yaml(cfg).encode())
    terms = parse_loss_types(cfg.loss_type, cfg.loss_weights)
    ctx = {"micro": cfg.micro_batch_size, "manifest": refs.manifest, "pad_id": tokenizer.pad_token_id or 0,
           "device": device, "dtype": cfg.dtype, "terms": terms, "pack_prompts": cfg.pack_prompts,
           "params": LossParams(cfg.beta, cfg.label_smoothing, cfg.discopop_tau, cfg.simpo_gamma)}
    params = [p for p in model.parameters() if p.requires_grad]
    bar = None
    if cfg.progress and dist.rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=steps, initial=step, unit="step", desc="train", file=sys.stderr, dynamic_ncols=True)
    stream = shards.batches(refs, cfg.batch_size, cfg.seed, cfg.shuffle_buffer, epoch, skip)
    started = time.time()
    last_eval: dict = {}
    end = min(steps, cfg.stop_at_step or steps)
    while step < end:
        t0 = time.time()
        epoch, consumed, batch = next(stream)
        mine = batch[dist.rank::dist.world]
        ctx["batch_chosen_tokens"] = float(sum(p["chosen_scored_tokens"] for p in batch))
        sums = dist.sum_(run_pairs(model, mine, len(batch), ctx, train=True))
        dist.sum_grads(params)
        metrics = means(sums)
        if not math.isfinite(metrics["loss"]):
            ids = ", ".join(p["pair_id"][:12] for p in batch[:8])
            raise TrainingError(f"non-finite loss {metrics['loss']} at step {step + 1} (epoch {epoch}); "
                                f"batch pair ids: {ids}{' ...' if len(batch) > 8 else ''}")
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        record = {"step": step, "epoch": round(epoch + consumed / refs.num_pairs, 4), **metrics,
                  "grad_norm": float(norm), "lr": lr, "tokens/s": float(sums[SUM_KEYS.index("tokens")]) / max(time.time() - t0, 1e-9)}
        if eval_refs is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or step == steps):
            last_eval = evaluate(model, eval_refs, ctx, dist.rank, dist.world, dist.sum_)
            record.update(last_eval)
            if stopper.on and stopper.update(step, last_eval) and dist.rank == 0:
                model.save_pretrained(os.path.join(stage, "best"), safe_serialization=True)
                tokenizer.save_pretrained(os.path.join(stage, "best"))
                with open(os.path.join(stage, "best", "best.json"), "w") as fh:
                    json.dump({"step": step, cfg.early_stopping_metric: stopper.best}, fh)
                _publish(stage, out, ("best",))
        if log is not None:
            log.write(record)
        if bar is not None:
            bar.set_postfix_str(f"loss {record['loss']:.4f} acc {record['rewards/accuracies']:.2f} "
                                f"{record['tokens/s']:.0f} tok/s")
            bar.update(1)
        if dist.rank == 0 and ((cfg.save_every and step % cfg.save_every == 0) or (step == end < steps)):
            _publish(stage, out, ("metrics.jsonl",))  # before the checkpoint: resume reads both
            checkpoint.save(out, stage, step, model, tokenizer, optimizer, scheduler,
                            {"epoch": epoch, "consumed": consumed, "early_stopping": stopper.state()},
                            cfg.keep_checkpoints)
        if stopper.should_stop:
            if dist.rank == 0:
                print(f"early stopping at step {step}: {cfg.early_stopping_metric} has not improved for "
                      f"{stopper.patience} evaluations (best {stopper.best:.4f} at step {stopper.best_step})",
                      file=sys.stderr)
            break
    if bar is not None:
        bar.close()
    summary = {"steps": step, "seconds": round(time.time() - started, 2), "output": out}
    if stopper.on:
        summary["best_step"] = stopper.best_step
    if step < steps and not stopper.should_stop:  # stopped early on purpose: the checkpoint above is the result
        if log is not None:
            log.close()
            _publish(stage, out, ("metrics.jsonl", "tensorboard"))
        return {**summary, "stopped_at": step, "first": {}, "last": {}, "eval": {}}
    if dist.rank == 0:
        model.save_pretrained(os.path.join(stage, "final"), safe_serialization=True)
        tokenizer.save_pretrained(os.path.join(stage, "final"))
        log.close()
        records = read(log.path)
        plot(records, os.path.join(stage, "curves.png"), f"{cfg.loss_type}, beta {cfg.beta}, lr {cfg.learning_rate}")
        _publish(stage, out, ("final", "metrics.jsonl", "curves.png", "tensorboard"))
        summary.update(first=records[0] if records else {}, last=records[-1] if records else {}, eval=last_eval)
    return summary


class EarlyStopping:
    """Counts evaluations without improvement of one eval metric (loss: lower is better)."""

    def __init__(self, metric: str, patience: int):
        self.metric, self.patience, self.on = metric, patience, patience > 0
        self.lower_is_better = metric.endswith("loss")
        self.best: float | None = None
        self.best_step, self.bad = 0, 0

    def update(self, step: int, evals: dict) -> bool:
        """Record an evaluation; True when it is the best so far."""
        value = evals[self.metric]
        better = self.best is None or (value < self.best if self.lower_is_better else value > self.best)
        if better:
            self.best, self.best_step, self.bad = value, step, 0
        else:
            self.bad += 1
        return better

    @property
    def should_stop(self) -> bool:
        return self.on and self.bad >= self.patience

    def state(self) -> dict:
        return {"best": self.best, "best_step": self.best_step, "bad": self.bad}

    def restore(self, state: dict | None) -> None:
        if state:
            self.best, self.best_step, self.bad = state["best"], state["best_step"], state["bad"]


def _ray_worker(config: dict) -> None:
    cfg = TrainConfig(**config)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // cfg.num_workers))
    train_loop(cfg)


def run(cfg: TrainConfig) -> dict:
    """One worker in-process; several as a Ray Train TorchTrainer (gloo on CPU, NCCL on GPU)."""
    if cfg.num_workers == 1:
        return train_loop(cfg)
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    init_ray(cfg.num_workers)
    use_gpu = ray.cluster_resources().get("GPU", 0) >= cfg.num_workers
    absolute = lambda u: os.path.abspath(u) if u and storage.is_local(u) else u  # noqa: E731  workers' cwd differs
    out = absolute(output_dir(cfg))
    config = dataclasses.asdict(dataclasses.replace(cfg, refs=absolute(cfg.refs), output=out,
                                                    eval_refs=absolute(cfg.eval_refs)))
    trainer = TorchTrainer(_ray_worker, train_loop_config=config,
                           scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=use_gpu,
                                                        resources_per_worker={"CPU": 1}),
                           run_config=RunConfig(storage_path=os.path.join(storage.staging_dir(out), "ray"),
                                                name="train"))
    trainer.fit()
    records = [json.loads(line) for line in storage.read_bytes(storage.join(out, "metrics.jsonl")).decode().splitlines()
               if line.strip()]
    return {"steps": records[-1]["step"] if records else 0, "output": out, "first": records[0] if records else {},
            "last": records[-1] if records else {},
            "eval": {k: v for k, v in (records[-1] if records else {}).items() if k.startswith("eval/")}}


def summary_text(s: dict) -> str:
    first, last = s.get("first", {}), s.get("last", {})
    lines = [f"train: {s['steps']} steps -> {s['output']}/final"]
    for key in ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected"):
        if key in last:
            lines.append(f"  {key:<20} {first.get(key, float('nan')):>9.4f} -> {last[key]:>9.4f}")
    for key, value in (s.get("eval") or {}).items():
        lines.append(f"  {key:<20} {value:>9.4f}")
    return "\n".join(lines)
