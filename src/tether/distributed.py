"""What tether needs to know about several processes (accelerate launch / torchrun): the Trainer and Accelerate do
the rest. Every function is a no-op answer in a single process.

Under FSDP2 (`fully_shard`) every parameter is a DTensor of which each process holds one shard. The regularizers that
keep per-parameter state (anchors, Fisher, importance) work on these local shards: their element-wise arithmetic is
exact shard by shard, their state is sharded with the parameters, and only scalars (the logged penalty values) are
summed across processes.
"""

from __future__ import annotations

from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn

T = TypeVar("T")

try:
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # torch without DTensor: nothing can be sharded
    DTensor, distribute_tensor = None, None


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


def from_main_process(value: T) -> T:
    """The main process's `value` in every process (pickled), for what only the main process computes."""
    if world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def is_sharded(t: torch.Tensor) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def has_sharded_parameters(model: nn.Module) -> bool:
    """Whether FSDP2 has sharded the model's parameters (each process holds a shard of every one)."""
    return any(is_sharded(p) for p in model.parameters())


def gathers_per_module(model: nn.Module) -> bool:
    """Whether DeepSpeed ZeRO-3 has partitioned the parameters: each module's call gathers its own, collectively,
    so every process must make the same module calls."""
    first = next(model.parameters(), None)  # ZeRO-3 partitions every parameter: one tells (checked every step)
    return first is not None and hasattr(first, "ds_id")  # the attribute ZeRO-3 gives partitioned params


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor, as a view (in-place changes reach the DTensor); any other tensor as is."""
    return t.to_local() if is_sharded(t) else t


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor, gathered from every process (a collective); any other tensor as is."""
    return t.full_tensor() if is_sharded(t) else t


def shard_like(whole: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This process's shard of `whole`, cut the way the DTensor `like` is sharded (no communication)."""
    if not is_sharded(like):
        return whole
    return distribute_tensor(whole, like.device_mesh, like.placements, src_data_rank=None).to_local()


def gather_like(shard: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The whole tensor whose shards, cut like the DTensor `like`, the processes hold (a collective)."""
    if not is_sharded(like):
        return shard
    mesh, placements = like.device_mesh, like.placements
    return DTensor.from_local(shard, mesh, placements, shape=like.shape, stride=like.stride()).full_tensor()


def shutdown() -> None:
    """At the end of a launched process: every process leaves the group together, so that no communication
    thread is still running when the interpreter exits (that aborts the process: "terminate called without an
    active exception")."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
