"""Every collective facli uses goes through this module; world size 1 never touches torch.distributed."""

import torch
import torch.distributed as dist

from facli.parallel.context import ParallelContext


def all_reduce_sum(tensor: torch.Tensor, ctx: ParallelContext) -> torch.Tensor:
    """Sum `tensor` over ranks, in place; returns it."""
    if ctx.is_distributed:
        dist.all_reduce(tensor)
    return tensor


def all_gather_last_dim(tensor: torch.Tensor, ctx: ParallelContext) -> torch.Tensor:
    """Concatenate each rank's `tensor` along its last dimension, in rank order."""
    if not ctx.is_distributed:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(ctx.world_size)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=-1)
