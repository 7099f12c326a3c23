"""Where tensors live and how many CPU threads a process takes: one rule for every stage.

`--device auto|cuda|cpu` (every stage's config). `auto` keeps the old rule (a GPU when there is
one) and says which it chose and why (a `device:` line on the console channel, stderr); `cuda` never
falls back to the CPU: work placed by Ray asks Ray for GPUs, which makes an autoscaler add GPU nodes,
and fails with a clear message when none come within `--gpu-wait-seconds`; `cpu` never touches a GPU.
"""

from __future__ import annotations

import os

from stages.core import console
from stages.core.errors import PipelineError


class NoGpu(PipelineError):
    """`--device cuda` where no GPU is, or none came within the wait."""


def pick_device(requested: str = "auto", what: str | None = None) -> str:
    """The device for work in this process: 'cuda' or 'cpu'. With `what`, an `auto` choice is said
    on the console with its reason."""
    import torch

    if requested == "cpu":
        return "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise NoGpu("--device cuda: this process sees no CUDA device (CUDA_VISIBLE_DEVICES="
                    f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')!r}); use --device cpu or auto to run on the CPU")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "auto" and what:
        why = (f"this process sees {torch.cuda.device_count()} CUDA device(s)" if device == "cuda"
               else "this process sees no CUDA device")
        console.say("device", f"{device} for {what} (--device auto: {why})")
    return device


def ray_use_gpu(requested: str, what: str, workers: int, gpus_each: int, timeout_s: float,
                need_all: bool = True) -> bool:
    """Whether `workers` Ray workers of `what` each get `gpus_each` GPUs.

    auto: when the cluster has them now (`need_all`: a GPU for every worker, else any), said on
    the console in one line with the reason (and, where an autoscaler could help, how to ask it). cuda:
    waits up to `timeout_s` for the cluster to hold them all at once (a placement group asks an
    autoscaler for the nodes) and raises `NoGpu` if it never does. cpu: no."""
    import ray

    if requested == "cpu":
        console.say("device", f"cpu for {what} (--device cpu)")
        return False
    if requested == "cuda":
        wait_for_gpus(what, workers, gpus_each, timeout_s)
        console.say("device", f"cuda for {what} (--device cuda: {workers} x {gpus_each} GPU)")
        return True
    have = ray.cluster_resources().get("GPU", 0)
    use = have >= workers * gpus_each if need_all else have >= gpus_each
    needed = workers * gpus_each if need_all else gpus_each
    hint = "; an autoscaling cluster adds GPU nodes only for --device cuda" if _may_scale(use, have) else ""
    console.say("device", f"{'cuda' if use else 'cpu'} for {what} (--device auto: the Ray cluster has {have:g} GPUs "
                f"now, {needed} needed{hint})")
    return use


def _may_scale(use: bool, have: float) -> bool:
    """Whether the autoscaling hint applies to an auto choice: GPUs were wanted and too few found on a
    cluster that could add them (one with some GPUs, or one joined through RAY_ADDRESS). A local Ray
    on a machine without a GPU can add none: the hint would only be noise there."""
    return not use and (have > 0 or bool(os.environ.get("RAY_ADDRESS")))


def wait_for_gpus(what: str, workers: int, gpus_each: int, timeout_s: float) -> None:
    """Reserve `workers` bundles of `gpus_each` GPUs (each bundle on one node) and let them go again:
    the reservation is the demand an autoscaler scales GPU nodes up for. `NoGpu` after `timeout_s`."""
    import ray
    from ray.exceptions import GetTimeoutError
    from ray.util.placement_group import placement_group, remove_placement_group

    bundles = [{"GPU": gpus_each, "CPU": 1}] * workers
    pg = placement_group(bundles, strategy="PACK")
    try:
        ray.get(pg.ready(), timeout=timeout_s)
    except GetTimeoutError:
        have = ray.cluster_resources().get("GPU", 0)
        raise NoGpu(f"--device cuda: {what} needs {workers} x {gpus_each} GPU (with a CPU each) and the Ray cluster "
                    f"did not provide them within {timeout_s:g}s (--gpu-wait-seconds); it has {have:g} GPUs. Add GPU "
                    "nodes (an autoscaler needs a GPU worker group), lower --num-workers, or use --device cpu / auto"
                    ) from None
    finally:
        remove_placement_group(pg)


def threads_per_worker(num_workers: int) -> int:
    """CPU threads for one of `num_workers` processes sharing this machine (at least one)."""
    return max(1, (os.cpu_count() or 1) // max(1, num_workers))
