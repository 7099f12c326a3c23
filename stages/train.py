"""`pipeline.py train`: train the policy from precomputed reference shards.

One worker trains in this process; `--num-workers N` runs the same loop on N Ray Train workers
(so does one worker with `--device cuda` where this process has no GPU: a Ray job's driver).
The loop itself is `stages.core.training.trainer`; this command decides whether the run resumes or starts
over, launches it, and reports its summary.
"""

from __future__ import annotations

import dataclasses
import os

import torch

from stages.core import storage
from stages.core.config.options import TrainConfig
from stages.core.lease import Lease, LeaseHeld, LeaseWatch
from stages.core.runtime.cluster import run_train_workers
from stages.core.runtime.preemption import Preempted, Preemption
from stages.core.training.run_folder import output_dir, prepare_output
from stages.core.training.trainer import ray_worker, train_loop


def run(cfg: TrainConfig) -> dict:
    """Train; returns the run's summary (`stages.core.training.trainer.summary`). Raises `Preempted` after
    a SIGTERM, once the checkpoint is written."""
    storage.configure(cfg.storage_options_dict)
    with Lease(output_dir(cfg), "train") as lease:  # one run at a time writes an output
        try:
            result = _run(cfg, lease)
        except Exception:
            try:  # a run stopped for a lost lease names who took it, not what its workers raised
                lease.check(read=True)
            except LeaseHeld:
                raise
            except Exception:  # noqa: BLE001 - the lease unreadable: the run's own error is the one to show
                pass
            raise
    if result["outcome"] == "preempted":
        raise Preempted(f"train: preempted (SIGTERM) at step {result['steps']} of {result['total_steps']}; "
                        f"checkpoint {result['weights']}: continue with --resume auto")
    return result


def _run(cfg: TrainConfig, lease: Lease) -> dict:
    resume_from = prepare_output(cfg)
    if cfg.num_workers == 1 and not (cfg.device == "cuda" and not torch.cuda.is_available()):
        preemption = Preemption()
        try:
            # this process's heartbeat, and the lease file itself (read every few seconds at most): a take-over
            # stops the loop at the next step even between two beats
            watch = LeaseWatch(lease.url, lease.run_id, lease.ttl)
            result = train_loop(cfg, resume_from, preemption, lambda: lease.is_lost() or watch.lost())
        finally:
            preemption.close()
    else:
        absolute = lambda u: os.path.abspath(u) if u and storage.is_local(u) else u  # noqa: E731  workers' cwd
        out = absolute(output_dir(cfg))
        cfg = dataclasses.replace(cfg, refs=absolute(cfg.refs), output=out, eval_refs=absolute(cfg.eval_refs))
        run_train_workers(ray_worker, {**dataclasses.asdict(cfg), "_resume_from": resume_from,
                                       "_lease": (lease.url, lease.run_id, lease.ttl)}, cfg.num_workers,
                          os.path.join(storage.staging_dir(out), "ray"), cfg.max_failures)
        result = storage.read_json(storage.join(out, "summary.json"))
    return result


# First and last step's values in the summary: pairs have an accuracy, unpaired examples (KTO) a KL estimate.
SUMMARY_KEYS = ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected", "kl")


def summary_text(s: dict) -> str:
    if s["outcome"] == "stopped":
        head = (f"train: stopped at step {s['steps']} of {s['total_steps']} -> {s['weights']} "
                "(continue with --resume)")
    elif s["outcome"] == "early_stopped":
        head = (f"train: early stop at step {s['steps']} of {s['total_steps']}; best weights (step {s['best_step']}) "
                f"-> {s['weights']}, last weights -> {storage.join(s['output'], 'final')}")
    else:
        head = f"train: {s['steps']} steps -> {s['weights']}"
    first, last = s["first"], s["last"]
    lines = [head]
    for key in SUMMARY_KEYS:  # those the run's records hold: pair losses and KTO log different ones
        if key in last:
            lines.append(f"  {key:<20} {first.get(key, float('nan')):>9.4f} -> {last[key]:>9.4f}")
    for key, value in s["eval"].items():
        lines.append(f"  {key:<20} {value:>9.4f}")
    return "\n".join(lines)
