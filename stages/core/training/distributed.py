"""Rank, world size and the few collectives the training loop needs itself; no-ops in one process.

Gradients are not among them: DDP and FSDP2 (`stages.core.training.parallel`) sync those during backward.
"""

from __future__ import annotations

import torch


class Dist:
    """The process group as the loop sees it (Ray Train sets it up; a plain run has none)."""

    def __init__(self):
        import torch.distributed as dist

        self.on = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.on else 0
        self.world = dist.get_world_size() if self.on else 1

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the run's files; the other ranks only compute."""
        return self.rank == 0

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """All-reduce (sum) in place; returns the tensor."""
        if self.on:
            import torch.distributed as dist

            if tensor.device.type == "cpu" and "nccl" in str(dist.get_backend()).lower():
                # Ray Train's GPU process group is NCCL alone, which reduces CUDA tensors only; the loop's sums
                # (metrics, stop flags) live on the CPU.
                on_device = tensor.to(torch.device("cuda", torch.cuda.current_device()))
                dist.all_reduce(on_device, op=dist.ReduceOp.SUM)
                tensor.copy_(on_device.cpu())
            else:
                dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def barrier(self) -> None:
        if self.on:
            import torch.distributed as dist

            dist.barrier()

    def any_(self, flag: bool) -> bool:
        """Whether `flag` is true on any worker (all workers get the same answer)."""
        return bool(self.sum_(torch.tensor([float(flag)])).item() > 0)
