"""Start or join Ray the same way for every stage; launch Ray Train workers for training."""

from __future__ import annotations

import os
from typing import Callable


def init_ray(min_cpus: int) -> None:
    """Join the cluster in RAY_ADDRESS (inside a Ray job), or start a local one with at least
    `min_cpus` logical CPUs; a no-op when Ray is already up."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(logging_level="WARNING")
    else:
        ray.init(num_cpus=max(os.cpu_count() or 1, min_cpus), include_dashboard=False, logging_level="WARNING")


def run_train_workers(worker: Callable[[dict], None], config: dict, num_workers: int, ray_dir: str) -> None:
    """Run `worker(config)` on `num_workers` Ray Train workers (DDP process group: gloo on CPU,
    NCCL when the cluster has a GPU for each); Ray's own run files go under `ray_dir`."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    init_ray(num_workers)
    use_gpu = ray.cluster_resources().get("GPU", 0) >= num_workers
    trainer = TorchTrainer(worker, train_loop_config=config,
                           scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                                        resources_per_worker={"CPU": 1}),
                           run_config=RunConfig(storage_path=ray_dir, name="train"))
    trainer.fit()
