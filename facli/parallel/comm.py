"""Every collective facli uses goes through this module; world size 1 never touches torch.distributed."""

import torch
import torch.distributed as dist
import torch.nn.functional as F

from facli.parallel import copy_engine
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


def broadcast_tokens(tokens: torch.Tensor, ctx: ParallelContext) -> torch.Tensor:
    """Make every rank hold rank 0's sampled `tokens` (any shape, integer); returns them.

    All ranks must agree on each sampled token or their KV caches diverge; broadcasting rank 0's
    choice is exact whatever the sampler does.
    """
    if not ctx.is_distributed:
        return tokens
    tokens = tokens.contiguous()
    dist.broadcast(tokens, src=0)
    return tokens


def barrier(ctx: ParallelContext) -> None:
    """Wait until every rank gets here."""
    if ctx.is_distributed:
        dist.barrier()


def row_parallel_linear(x: torch.Tensor, weight: torch.Tensor, ctx: ParallelContext,
                        bias: torch.Tensor | None = None) -> torch.Tensor:
    """sum over ranks of x W^T (+ bias once): x [..., in/N] and weight [out, in/N] -> [..., out].

    With ctx.settings.tile_tokens set and at least two tiles of tokens, the output is computed
    tile by tile along the token dimension into one preallocated buffer and each tile's
    all_reduce is launched asynchronously as soon as its GEMM is done, so it runs while the next
    tile's GEMM computes (tiling-AllReduce). On NCCL the collectives run on NCCL's own stream;
    on gloo on its worker threads. Every element is reduced exactly as by one all_reduce.
    """
    if not ctx.is_distributed:
        return F.linear(x, weight, bias)
    rows = x.reshape(-1, x.shape[-1])
    out = start_row_parallel(rows, weight, ctx, tile_bounds(rows.shape[0], ctx)).wait_all()
    out = out.view(*x.shape[:-1], weight.shape[0])
    return out if bias is None else out + bias


def tile_bounds(count: int, ctx: ParallelContext) -> list[tuple[int, int]]:
    """Token ranges of the AllReduce tiles for `count` tokens: one range unless two tiles fit."""
    tile = ctx.settings.tile_tokens
    if tile is None or count < 2 * tile:
        return [(0, count)]
    return [(start, min(start + tile, count)) for start in range(0, count, tile)]


class PendingRows:
    """A row-parallel output [rows, out] whose tiles are being summed over ranks."""

    def __init__(self, out: torch.Tensor, bounds, works):
        self.out, self.bounds, self._works = out, bounds, works

    def tile(self, index: int) -> torch.Tensor:
        """Tile `index` of the output, once its sum over ranks is done (for the current stream)."""
        work = self._works[index]
        if isinstance(work, torch.cuda.Event):
            torch.cuda.current_stream().wait_event(work)
        elif work is not None:
            # On NCCL, wait() only makes the current stream wait for the collective's stream.
            work.wait()
        self._works[index] = None
        start, stop = self.bounds[index]
        return self.out[start:stop]

    def wait_all(self) -> torch.Tensor:
        for index in range(len(self.bounds)):
            self.tile(index)
        return self.out


def start_row_parallel(rows: torch.Tensor, weight: torch.Tensor, ctx: ParallelContext,
                       bounds: list[tuple[int, int]]) -> PendingRows:
    """rows [R, in/N] @ weight[out, in/N]^T tile by tile (`bounds`), each tile's all_reduce
    launched asynchronously right after its GEMM; returns without waiting for any of them."""
    out = torch.empty(rows.shape[0], weight.shape[0], dtype=rows.dtype, device=rows.device)
    weight_t = weight.t()
    skip = ctx.settings.skip_row_reduce or not ctx.is_distributed
    works = []
    for start, stop in bounds:
        part = out[start:stop]  # rows of a contiguous buffer: contiguous, as collectives need
        torch.mm(rows[start:stop], weight_t, out=part)
        if skip:
            works.append(None)
        elif (reducer := _copy_engine_reducer(part, ctx)) is not None:
            works.append(reducer.start_sum(part))
        else:
            works.append(dist.all_reduce(part, async_op=True))
    return PendingRows(out, bounds, works)


def _copy_engine_reducer(part: torch.Tensor, ctx: ParallelContext):
    """The copy-engine reducer for this output tile, or None where all_reduce sums it (other
    settings, small tiles, GPUs that cannot map each other's memory, or a CUDA-graph capture,
    whose replays would repeat one slot sequence that the reducer's round-robin does not know)."""
    tile = ctx.settings.tile_tokens
    if (ctx.settings.reduce_engine != "copy" or part.device.type != "cuda" or tile is None
            or part.shape[0] > tile or part.numel() * part.element_size() < copy_engine.MIN_TILE_BYTES
            or torch.cuda.is_current_stream_capturing() or not copy_engine.usable(ctx.world_size)):
        return None
    return copy_engine.reducer_for(tile, part.shape[1], part.dtype, part.device)
