"""Peak memory of a benchmark worker: the RSS of its whole process tree (Ray workers, data loaders)."""

from __future__ import annotations

import resource
import threading
import time

_TREE_PEAK = [0.0]


def watch_process_tree(interval: float = 0.02) -> None:
    """Sample the RSS of this process plus all its descendants in a background thread."""
    import psutil

    me = psutil.Process()

    def loop():
        while True:
            total = 0
            for proc in [me, *me.children(recursive=True)]:
                try:
                    total += proc.memory_info().rss
                except psutil.Error:  # exited between listing and reading
                    pass
            _TREE_PEAK[0] = max(_TREE_PEAK[0], total / 2**20)
            time.sleep(interval)

    threading.Thread(target=loop, daemon=True).start()


def peak_rss_mb() -> float:
    """Peak RSS of the process tree (sampled), or this process's exact kernel-recorded peak when that
    is higher: sampling can miss a short peak."""
    return max(_TREE_PEAK[0], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
