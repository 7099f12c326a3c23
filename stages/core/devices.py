"""Where tensors live and how many CPU threads a process takes: one rule for every stage."""

from __future__ import annotations

import os


def pick_device() -> str:
    """'cuda' when a GPU is visible to this process, else 'cpu'."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def threads_per_worker(num_workers: int) -> int:
    """CPU threads for one of `num_workers` processes sharing this machine (at least one)."""
    return max(1, (os.cpu_count() or 1) // max(1, num_workers))
