"""What tether needs to know about several processes (accelerate launch / torchrun): the Trainer and Accelerate do
the rest. Every function is a no-op answer in a single process."""

from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if world_size() > 1 else 0


def is_main_process() -> bool:
    """Only this process writes files (metrics, model, Fisher, report)."""
    return rank() == 0


def sum_across_processes(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each tensor summed over all processes, in place (one all-reduce per tensor)."""
    if world_size() > 1:
        for t in tensors:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return tensors


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()
