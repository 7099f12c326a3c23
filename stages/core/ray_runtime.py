"""Start or join Ray the same way for every stage; launch Ray Train workers for training."""

from __future__ import annotations

import logging
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
        return
    # A new local cluster gets token authentication, Ray's default, and a WARNING on every start that
    # says so: a notice, not a problem (its other warning, auth disabled, is only for joining a cluster).
    auth_log = logging.getLogger("ray._private.authentication.authentication_token_setup")
    level = auth_log.level
    auth_log.setLevel(logging.ERROR)
    try:
        # "local": always a cluster of our own, never one someone started with `ray start` on this
        # machine (which Ray would join when given no address).
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, min_cpus), include_dashboard=False,
                 logging_level="WARNING")
    finally:
        auth_log.setLevel(level)


def quiet_ray_data() -> None:
    """Ray Data settings for a stage that draws its own progress bar: Ray Data's bars, its
    execution-start line and stats summary are off, and its INFO lines (one per finished dataset)
    no longer reach the console, where they would cut through our bar. Its warnings and errors still
    print, and everything still goes to ray-data.log in the Ray session's log folder."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.enable_auto_log_stats = False
    # Ray Data warns on every run that its bars are off: that is our choice, not a problem.
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler):  # the console; its file handler is a plain Handler
            handler.setLevel(max(handler.level, logging.WARNING))


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
