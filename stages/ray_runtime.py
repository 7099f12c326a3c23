"""Start or join Ray the same way for every stage."""

from __future__ import annotations

import os


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
