"""The training loop: the policy alone in memory, reference log-probs read from the shards.

One `train_loop` serves a single process and each Ray Train worker. Every worker streams the
same global order of pairs and takes its slice of each optimizer batch (pairs i with
i % world == rank); DDP or FSDP2 (`stages.core.training.parallel`) sums the gradients over workers, so N
workers reproduce one worker's updates with the same global `batch_size`. No reference model is
ever loaded. A LoRA policy trains only its adapters.

The loop reads top to bottom: `start` (load, restore), then per step `train_step`,
`evaluate_step`, `log_step`, `checkpoint_step`, then `finish`. Every run ends with the same
summary (`summary`), written by rank 0 to OUTPUT/summary.json.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from stages.core import console, storage
from stages.core.config.engine import to_yaml
from stages.core.config.options import TrainConfig
from stages.core.lease import LeaseHeld, LeaseWatch
from stages.core.plots import training_curves
from stages.core.refs.stream import Refs, batches, check_tokenizer, load_refs
from stages.core.runtime.devices import pick_device, threads_per_worker
from stages.core.runtime.preemption import Preemption
from stages.core.scoring import attention as attention_setting
from stages.core.training import checkpoint, parallel
from stages.core.training.distributed import Dist
from stages.core.training.early_stopping import EarlyStopping
from stages.core.training.metrics import MetricsLog, read
from stages.core.training.policy_pass import (
    PassContext,
    heldout_metrics,
    kl_sums,
    load_policy,
    metrics_of,
    pass_context,
    rounds_for,
    run_pairs,
)
from stages.core.training.run_folder import TrainingError, output_dir
from stages.core.training.unpaired_losses import kl_estimate


def total_steps(cfg: TrainConfig, num_pairs: int) -> int:
    return cfg.max_steps or cfg.epochs * math.ceil(num_pairs / cfg.batch_size)


@dataclass
class Run:
    """The live state of one training run; the loop's steps advance it."""

    cfg: TrainConfig
    dist: Dist
    out: str                  # OUTPUT: local folder or URL
    staging: str              # local folder written first, uploaded at checkpoints and at the end
    refs: Refs
    eval_refs: Refs | None
    tokenizer: Any
    model: Any                # the transformers model (FSDP2 shards its parameters in place)
    wrapped: Any              # what the loop calls: `parallel.PolicyCall` under DDP / FSDP2
    lora: Any                 # peft LoraConfig, or None
    optimizer: torch.optim.Optimizer
    scheduler: Any
    steps: int                # optimizer steps of the whole schedule
    ctx: PassContext
    stopper: EarlyStopping
    log: MetricsLog | None    # rank 0 only
    preemption: Preemption
    model_path: str           # the policy's starting weights (the LoRA base), absolute when local
    step: int = 0
    epoch: int = 0
    consumed: int = 0         # pairs of `epoch` already trained on
    last_eval: dict = field(default_factory=dict)
    started: float = field(default_factory=time.time)

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    @property
    def parts(self) -> checkpoint.Parts:
        lora = None if self.lora is None else {"r": self.cfg.lora_r, "alpha": self.cfg.lora_alpha,
                                               "dropout": self.cfg.lora_dropout,
                                               "target_modules": self.cfg.lora_target_modules}
        return checkpoint.Parts(self.model, self.tokenizer, self.optimizer, self.scheduler,
                                {"model": self.model_path, "lora": lora})

    def publish(self, *names: str) -> None:
        """Upload run files from the staging folder (a no-op for a local OUTPUT)."""
        for name in names:
            local = os.path.join(self.staging, name)
            if os.path.exists(local):
                storage.upload(local, storage.join(self.out, name))


def _optimizer(cfg: TrainConfig, model, steps: int):
    from transformers import get_scheduler

    # Only what trains gets AdamW state (with LoRA: the adapters). fused: one kernel over all
    # parameters, without the foreach path's temporary copies of them.
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, fused=True)
    scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=int(cfg.warmup_ratio * steps),
                              num_training_steps=steps)
    return optimizer, scheduler


# What --compile compiles with: inductor (fused kernels). The tests use "aot_eager" (the same graph capture,
# forward and backward, without generating kernels, which takes tens of seconds even for a tiny model).
COMPILE_BACKEND = "inductor"


def _adapt(cfg: TrainConfig, model):
    """LoRA adapters when asked for, activation checkpointing, compiled decoder layers, training mode
    -> (model, LoraConfig | None)."""
    from stages.core.runtime.models import enable_activation_checkpointing

    lora = None
    if cfg.lora_r:
        model, lora = parallel.add_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules)
    if cfg.gradient_checkpointing:
        enable_activation_checkpointing(model)
    if cfg.compile:
        # Each decoder layer on its own (as torchtitan does): one small graph, compiled once and reused by every
        # layer, that FSDP2 can still shard layer by layer; dynamic, as packed micro-batches vary in length.
        # `Module.compile` keeps the parameter names, so checkpoints and final/ are as without it.
        for layer in parallel.decoder_layers(model):
            layer.compile(dynamic=True, backend=COMPILE_BACKEND)
    model.train()
    return model, lora


def _load_policy(cfg: TrainConfig, refs: Refs, device: str, dist: Dist):
    """-> (tokenizer, model, LoraConfig | None, the module the loop calls, the model's path). float32 master weights
    (bf16 is autocast, or FSDP2's mixed precision). Under FSDP2 only rank 0 reads the weights, into
    CPU memory; every worker builds the model on the meta device, shards it and receives its shards
    from rank 0, so no device ever holds the whole model."""
    from stages.core.runtime.models import load_model, load_tokenizer, resolve_model, tokenizer_hashes

    reference = refs.manifest.reference_model.path
    model_path = resolve_model(cfg.model or reference)
    # Written into policy.json and adapter_config.json: absolute, so they load from any folder.
    model_path = os.path.abspath(model_path) if os.path.isdir(model_path) else model_path
    if dist.is_main and os.path.realpath(model_path) != os.path.realpath(reference):
        console.note(f"policy starts from {model_path}, the shards' reference is {reference}")
    if dist.is_main and cfg.progress:  # before the bar: loading a real model takes a while on a CPU
        console.say("train", f"loading the policy {model_path} ({device}{', LoRA' if cfg.lora_r else ''})")
    if not (cfg.strategy == "fsdp" and dist.world > 1):
        tokenizer, model = load_policy(model_path, refs, device)
        model, lora = _adapt(cfg, model)
        return tokenizer, model, lora, parallel.wrap(model, cfg.strategy, dist.world, cfg.dtype), model_path
    tokenizer = load_tokenizer(model_path)
    check_tokenizer(refs, tokenizer_hashes(tokenizer))
    full = _adapt(cfg, load_model(model_path, "float32", "cpu"))[0] if dist.is_main else None
    model, lora = _adapt(cfg, parallel.meta_model(model_path))
    wrapped = parallel.wrap(model, "fsdp", dist.world, cfg.dtype)
    parallel.fill_from_rank0(model, full, device)
    return tokenizer, model, lora, wrapped, model_path


def start(cfg: TrainConfig, resume_from: str | None, preemption: Preemption | None = None) -> Run:
    """Load shards, policy and optimizer; restore `resume_from` when given."""
    storage.configure(cfg.storage_options_dict)
    dist = Dist()
    device = pick_device(cfg.device, None if dist.on else "training")
    attention_setting.resolve(cfg.attention, device, backward=True)  # flex on CPU: refused before the model loads
    if device == "cuda" and dist.on:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    out = output_dir(cfg)
    refs = load_refs(cfg.refs)
    tokenizer, model, lora, wrapped, model_path = _load_policy(cfg, refs, device, dist)
    # Shard rows are checked against the embedding as they stream: an id past it would fail in torch.
    vocab = model.get_input_embeddings().num_embeddings
    refs = dataclasses.replace(refs, vocab_size=vocab)
    steps = total_steps(cfg, refs.num_pairs)
    optimizer, scheduler = _optimizer(cfg, model, steps)
    ctx = pass_context(cfg, refs.manifest, tokenizer.pad_token_id or 0, device)
    eval_refs = load_refs(cfg.eval_refs, vocab) if cfg.eval_refs else None
    run = Run(cfg, dist, out, storage.staging_dir(out), refs, eval_refs, tokenizer, model, wrapped, lora, optimizer,
              scheduler, steps, ctx, EarlyStopping(cfg.early_stopping_metric, cfg.early_stopping_patience), None,
              preemption or Preemption(listen=False), model_path)
    if resume_from is not None:
        state = checkpoint.load(resume_from, run.parts, dist)
        pinned = state.get("refs_contents")  # older checkpoints pinned nothing
        if pinned is not None and pinned != refs.manifest.contents:
            raise TrainingError(f"{cfg.refs} changed since this run started (a precompute added, repaired or replaced "
                                f"shards): resuming on other pairs would mix two data sets; restore those refs, or "
                                f"start over with --overwrite")
        run.step, run.epoch, run.consumed = state["step"], state["epoch"], state["consumed"]
        run.stopper.restore(state.get("early_stopping"))
        if dist.is_main and storage.exists(storage.join(out, "metrics.jsonl")):
            storage.download(storage.join(out, "metrics.jsonl"), os.path.join(run.staging, "metrics.jsonl"))
    if dist.is_main:
        checkpoint.remove_partials(run.staging)
        run.log = MetricsLog(run.staging, run.step if resume_from is not None else None)
        storage.write_bytes_atomic(storage.join(out, "train_config.yaml"), to_yaml(cfg).encode())
    return run


def train_step(run: Run, epoch: int, consumed: int, batch: list[dict]) -> dict:
    """One optimizer step on this worker's slice of the global batch; returns the step's record."""
    t0 = time.time()
    world = run.dist.world
    mine = batch[run.dist.rank::world]
    chosen_tokens = float(sum(p["chosen_scored_tokens"] for p in batch))
    # DDP and FSDP2 average gradients over workers: each scales its slice by `world` so the average
    # is the batch's sum. Every worker runs as many micro-batches as the one with the most pairs.
    rounds = rounds_for(batch, world, run.ctx)
    kl = 0.0
    if run.ctx.needs_kl:  # KTO: the KL estimate over the whole optimizer batch and every worker, first
        kl = float(kl_estimate(*run.dist.sum_(kl_sums(run.wrapped, mine, run.ctx, rounds, batch[:1]))))
    sums = run.dist.sum_(run_pairs(run.wrapped, mine, run.ctx, len(batch) / world, chosen_tokens, train=True,
                                   rounds=rounds, ghost=batch[:1], kl=kl))
    metrics = metrics_of(sums, run.ctx, kl=kl)
    if not math.isfinite(metrics["loss"]):
        ids = ", ".join(p["pair_id"][:12] for p in batch[:8])
        raise TrainingError(f"non-finite loss {metrics['loss']} at step {run.step + 1} (epoch {epoch}); "
                            f"batch pair ids: {ids}{' ...' if len(batch) > 8 else ''}")
    norm = parallel.clip_grad_norm(run.params, run.cfg.max_grad_norm)
    lr = run.scheduler.get_last_lr()[0]
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step, run.epoch, run.consumed = run.step + 1, epoch, consumed
    tokens_per_s = float(sums[run.ctx.sum_keys.index("tokens")]) / max(time.time() - t0, 1e-9)
    return {"step": run.step, "epoch": round(epoch + consumed / run.refs.num_pairs, 4), **metrics,
            "grad_norm": float(norm), "lr": lr, "tokens/s": tokens_per_s}


def evaluate_step(run: Run) -> dict:
    """eval/* metrics when this step is an evaluation step; keeps the best weights for early stopping."""
    cfg = run.cfg
    if run.eval_refs is None or not ((cfg.eval_every and run.step % cfg.eval_every == 0) or run.step == run.steps):
        return {}
    run.last_eval = heldout_metrics(run.wrapped, run.eval_refs, run.ctx, run.dist.rank, run.dist.world, run.dist.sum_)
    if run.stopper.on and run.stopper.update(run.step, run.last_eval):
        save_weights(run, "best")  # every worker: a collective under FSDP2
        if run.dist.is_main:
            storage.write_json(os.path.join(run.staging, "best", "best.json"),
                               {"step": run.step, cfg.early_stopping_metric: run.stopper.best})
            run.publish("best")
    return run.last_eval


def save_weights(run: Run, name: str) -> None:
    """STAGING/name: one consolidated safetensors model that transformers loads (LoRA: merged, the
    adapter in name/adapter/). Every worker calls it; rank 0 gathers and writes."""
    state = parallel.full_state_dict(run.model)
    if not run.dist.is_main:
        return
    folder = os.path.join(run.staging, name)
    if run.lora is not None:
        from safetensors.torch import save_file

        adapter = os.path.join(folder, "adapter")
        os.makedirs(adapter, exist_ok=True)
        save_file({k: v.contiguous() for k, v in parallel.adapter_state(state).items()},
                  os.path.join(adapter, "adapter_model.safetensors"), metadata={"format": "pt"})
        config = dataclasses.replace(run.lora, base_model_name_or_path=run.model_path)
        config.save_pretrained(adapter)
        run.tokenizer.save_pretrained(adapter)  # so the folder alone is a policy `eval --model` takes
        state = parallel.merge_lora(state, run.lora)
    run.model.save_pretrained(folder, state_dict=state, safe_serialization=True)
    run.tokenizer.save_pretrained(folder)
    storage.plain_modes(folder)  # safetensors writes through a 0600 temporary file: others could not read it


def checkpoint_step(run: Run, end: int, preempted: bool = False) -> None:
    """Save every `save_every` steps, at a --stop-at-step end (the run goes on from there), and when
    preempted. Every worker writes its part."""
    cfg = run.cfg
    if not ((cfg.save_every and run.step % cfg.save_every == 0) or run.step == end < run.steps or preempted):
        return
    changed = run.dist.is_main and load_refs(run.refs.root).manifest.contents != run.refs.manifest.contents
    if run.dist.any_(changed):  # a precompute rewrote the refs under this run: never train on a changed set
        raise TrainingError(f"{cfg.refs} changed while this run trained (a precompute added, repaired or replaced "
                            f"shards; step {run.step}): stopped before its checkpoint; restore the refs and resume, or "
                            "start over with --overwrite")
    if run.dist.is_main:
        run.publish("metrics.jsonl")  # before the checkpoint: resume reads both
    checkpoint.save(run.out, run.staging, run.step, run.parts,
                    {"epoch": run.epoch, "consumed": run.consumed, "early_stopping": run.stopper.state(),
                     "refs_contents": run.refs.manifest.contents}, cfg.keep_checkpoints, run.dist)


def summary(run: Run, outcome: str, weights: str) -> dict:
    """The one summary shape of every run (also OUTPUT/summary.json)."""
    records = read(run.log.path) if run.log is not None else []
    return {"outcome": outcome, "steps": run.step, "total_steps": run.steps, "output": run.out, "weights": weights,
            "best_step": run.stopper.best_step if run.stopper.on else None,
            "seconds": round(time.time() - run.started, 2), "first": records[0] if records else {},
            "last": records[-1] if records else {}, "eval": run.last_eval}


def finish(run: Run) -> dict:
    """Save final/ (unless stopped on purpose before the end), plot, upload; return the summary."""
    early = run.stopper.should_stop
    if run.step < run.steps and not early:  # --stop-at-step or SIGTERM: the checkpoint is the result
        outcome = "preempted" if run.preemption.requested else "stopped"
        weights = storage.join(run.out, checkpoint.CHECKPOINTS, f"step-{run.step}")
    else:
        outcome, weights = ("early_stopped", storage.join(run.out, "best")) if early else \
            ("finished", storage.join(run.out, "final"))
        save_weights(run, "final")
    if not run.dist.is_main:
        return summary(run, outcome, weights)
    run.log.close()
    cfg = run.cfg
    if outcome not in ("stopped", "preempted"):
        training_curves(read(run.log.path), os.path.join(run.staging, "curves.png"),
                        f"{cfg.loss_type}, beta {cfg.beta}, lr {cfg.learning_rate}")
    result = summary(run, outcome, weights)
    storage.write_json(os.path.join(run.staging, "summary.json"), result)
    run.publish("final", "metrics.jsonl", "curves.png", "tensorboard", "summary.json")
    return result


# What the bar shows after a step, each where the step's record has it: pair losses log an accuracy,
# unpaired ones (KTO) a KL estimate instead, and a KTO batch of one class has no margin.
BAR_FIELDS = (("loss", "loss {:.4f}"), ("rewards/accuracies", "acc {:.2f}"), ("rewards/margins", "margin {:.3f}"),
              ("kl", "kl {:.3f}"), ("tokens/s", "{:.0f} tok/s"))
# Until the first step ends the bar sits at 0 (on a CPU, minutes with a real model): it says why.
FIRST_STEP = "train (first step: reading shards, forward and backward)"


def bar_postfix(record: dict) -> str:
    return " ".join(text.format(record[key]) for key, text in BAR_FIELDS if key in record)


def _progress_bar(run: Run):
    if not (run.cfg.progress and run.dist.is_main):
        return None
    from tqdm import tqdm

    return tqdm(total=run.steps, initial=run.step, unit="step", desc=FIRST_STEP, file=sys.stderr,
                dynamic_ncols=True)


def _advance(bar, record: dict) -> None:
    bar.set_description("train", refresh=False)
    bar.set_postfix_str(bar_postfix(record), refresh=False)
    bar.update(1)


def train_loop(cfg: TrainConfig, resume_from: str | None = None, preemption: Preemption | None = None,
               lease_lost: Callable[[], bool] | None = None) -> dict:
    """Train; returns the summary. Runs as is in one process or inside a Ray Train worker.
    `lease_lost()`: asked after every optimizer step (by every worker, their answers or-ed); when the run
    no longer holds its output's lease the loop stops at once, writing nothing more (LeaseHeld)."""
    run = start(cfg, resume_from, preemption)
    stream = batches(run.refs, cfg.batch_size, cfg.seed, cfg.shuffle_buffer, run.epoch, run.consumed)
    end = min(run.steps, cfg.stop_at_step or run.steps)
    bar = _progress_bar(run)
    with storage.local_write(run.staging):  # metrics, TensorBoard, final/, curves: on a full disk, one line
        while run.step < end and not run.stopper.should_stop:
            record = train_step(run, *next(stream))
            if lease_lost is not None and run.dist.any_(lease_lost()):
                raise LeaseHeld(f"train: {cfg.output}: this run lost its output's lease at step {run.step} (another "
                                "run took it over, or it could not be renewed); stopped without writing more")
            record.update(evaluate_step(run))
            if run.log is not None:
                run.log.write(record)
            if bar is not None:
                _advance(bar, record)
            preempted = run.dist.any_(run.preemption.asked()) and run.step < end
            checkpoint_step(run, end, preempted)
            if preempted:
                run.preemption.requested = True
                break
        if bar is not None:
            bar.close()
        if run.stopper.should_stop and run.dist.is_main:
            console.say("train", f"early stopping at step {run.step}: {cfg.early_stopping_metric} has not improved "
                        f"for {run.stopper.patience} evaluations (best {run.stopper.best:.4f} at step "
                        f"{run.stopper.best_step})")
        return finish(run)


def ray_worker(config: dict) -> None:
    """Ray Train's train_loop_per_worker: the same loop, this worker's share of the CPU threads.
    After a worker failure Ray Train starts the group again: it resumes from the run's latest
    checkpoint (the driver removed any older run's before the first start)."""
    from stages.core.runtime.cluster import preemption_asker

    config = dict(config)
    resume_from, flag = config.pop("_resume_from"), config.pop("_preemption_flag")
    watch = LeaseWatch(*config.pop("_lease")) if config.get("_lease") else None
    config.pop("_lease", None)
    cfg = TrainConfig(**config)
    storage.configure(cfg.storage_options_dict)
    resume_from = checkpoint.latest(output_dir(cfg)) or resume_from
    torch.set_num_threads(threads_per_worker(cfg.num_workers))
    train_loop(cfg, resume_from, Preemption(preemption_asker(flag)), watch.lost if watch else None)
