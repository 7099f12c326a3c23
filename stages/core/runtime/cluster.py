"""Start or join Ray the same way for every stage; launch Ray Train workers for training."""

from __future__ import annotations

import logging
import os
from typing import Callable

from stages.core.runtime.devices import ray_use_gpu


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
    # A task's own exception reaches the driver (inside Ray's RayTaskError, as its `cause`), not Ray Data's
    # UserCodeException, whose pickled form drops the cause: so a DataError or a full disk in a task
    # ends the stage with its own one-line message. Ray Data's log of it stays in ray-data.log only.
    ctx.raise_original_map_exception = True
    # Ray Data warns on every run that its bars are off: that is our choice, not a problem.
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler):  # the console; its file handler is a plain Handler
            handler.setLevel(max(handler.level, logging.WARNING))
            if _no_task_errors not in handler.filters:
                handler.addFilter(_no_task_errors)


_TASK_ERROR_LOGGERS = ("ray.data.exceptions", "ray.data._internal.execution.streaming_executor_state")


def _no_task_errors(record: logging.LogRecord) -> bool:
    """Console filter: Ray Data's report of a failed task, with its traceback (the stage raises the
    task's error itself, and the CLI prints it in one line)."""
    return not record.name.startswith(_TASK_ERROR_LOGGERS)


class _PreemptionFlag:
    """A tiny actor the driver raises on SIGTERM and the workers read once a step: the driver can
    take signals, Ray Train's workers (threads) cannot."""

    def __init__(self):
        self.raised = False

    def raise_(self) -> None:
        self.raised = True

    def get(self) -> bool:
        return self.raised


def preemption_asker(name: str | None) -> Callable[[], bool] | None:
    """What a worker calls to learn whether the driver was sent SIGTERM."""
    if not name:
        return None
    import ray

    flag = ray.get_actor(name)
    return lambda: ray.get(flag.get.remote())


def run_train_workers(worker: Callable[[dict], None], config: dict, num_workers: int, ray_dir: str,
                      max_failures: int = 0) -> bool:
    """Run `worker(config)` on `num_workers` Ray Train workers (process group: gloo on CPU, NCCL on
    GPUs: one GPU per worker as `config["device"]` says, see `devices.ray_use_gpu`; the workers get
    the device chosen); Ray's own run files go under `ray_dir`. Up to
    `max_failures` times, a dead worker makes Ray Train start the group again. Returns whether the
    driver was sent SIGTERM (the workers then stop after a checkpoint)."""
    import signal
    import uuid

    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    init_ray(num_workers)
    use_gpu = ray_use_gpu(config.get("device", "auto"), f"{num_workers} training worker(s)", num_workers, 1,
                          config.get("gpu_wait_seconds", 600.0))
    config = {**config, "device": "cuda" if use_gpu else "cpu"}
    name = f"preemption-{uuid.uuid4().hex[:12]}"
    flag = ray.remote(num_cpus=0)(_PreemptionFlag).options(name=name).remote()
    got = []

    def on_sigterm(signum, frame):
        got.append(signum)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second one ends the driver at once
        flag.raise_.remote()

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        trainer = TorchTrainer(worker, train_loop_config={**config, "_preemption_flag": name},
                               scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                                            resources_per_worker={"CPU": 1}),
                               run_config=RunConfig(storage_path=ray_dir, name="train",
                                                    failure_config=FailureConfig(max_failures=max_failures)))
        trainer.fit()
    finally:
        signal.signal(signal.SIGTERM, previous)
        ray.kill(flag)
    return bool(got)


def actor_pool_map(ds, cls, batch_size: int, size: int, **remote_args):
    """`ds.map_batches(cls)` (pyarrow batches) on a pool of `size` actors that are never restarted.

    Ray Data's default (restart a dead actor, retry its calls) makes Ray log an error-level line on
    every run (ray-project/ray#57733: the pool's constructor arguments live in the object store) and
    retries without end a batch that kills its process each time. Without restarts a pool that loses a
    process fails the stage, whose re-run goes on from what it wrote. Ray Data takes the setting only
    among its free-form remote arguments, deprecated since Ray 2.60 (the warning is silenced here):
    where they are gone, nothing."""
    import inspect
    import warnings

    import ray.data

    params = inspect.signature(ds.map_batches).parameters.values()
    extra = {"max_restarts": 0} if any(p.kind is p.VAR_KEYWORD for p in params) else {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ray_remote_args.* is deprecated")
        return ds.map_batches(cls, batch_format="pyarrow", batch_size=batch_size,
                              compute=ray.data.ActorPoolStrategy(size=size), **remote_args, **extra)
