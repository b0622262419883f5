"""Every collective facli uses goes through this module; world size 1 never touches torch.distributed."""

import torch
import torch.distributed as dist
import torch.nn.functional as F

from facli.kernels import elementwise
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
    Through the copy engines the two ranks relay the tiles instead (facli.parallel.copy_engine):
    the sum is rounded once, and the result is a view of the exchange's inbox, valid until the
    projection after next.
    """
    if not ctx.is_distributed:
        return F.linear(x, weight, bias)
    rows = x.reshape(-1, x.shape[-1])
    bounds = tile_bounds(rows.shape[0], ctx)
    relay = ctx.settings.relay_sums and not ctx.settings.skip_row_reduce
    exchange = None if not relay else _copy_engine_exchange(
        rows.shape[0], weight.shape[0], rows, bounds, ctx)
    if exchange is not None:
        out = _relayed(rows, weight, exchange, bounds, ctx)
    else:
        out = start_row_parallel(rows, weight, ctx, bounds).wait_all()
    out = out.view(*x.shape[:-1], weight.shape[0])
    return out if bias is None else out + bias


def tile_bounds(count: int, ctx: ParallelContext) -> list[tuple[int, int]]:
    """Token ranges of the AllReduce tiles for `count` tokens: one range unless two tiles fit."""
    tile = ctx.settings.tile_tokens
    if tile is None or count < 2 * tile:
        return [(0, count)]
    return [(start, min(start + tile, count)) for start in range(0, count, tile)]


class PendingRows:
    """A row-parallel output [rows, out] computed tile by tile (`bounds`), each tile's sum over
    ranks started as soon as its GEMM is queued (`compute`) and read back by `tile` or `finish`.

    NCCL sums each tile with an asynchronous all_reduce. Between two peer GPUs with
    ctx.settings.reduce_engine "copy", each rank pushes its partial tile to the peer with the
    copy engines, and the kernel that reads the tile adds the two partials (copy_engine)."""

    def __init__(self, count: int, features: int, like: torch.Tensor, ctx: ParallelContext, bounds):
        self.out = torch.empty(count, features, dtype=like.dtype, device=like.device)
        self.bounds, self.ctx = bounds, ctx
        self._works: list = [None] * len(bounds)
        self._skip = ctx.settings.skip_row_reduce or not ctx.is_distributed
        self._exchange = None if self._skip else _copy_engine_exchange(count, features, like, bounds, ctx)
        if self._exchange is not None:
            self._inbox, self._sequence = self._exchange.begin()

    def compute(self, index: int, rows: torch.Tensor, weight: torch.Tensor) -> None:
        """Tile `index` = rows @ weight^T (rows [tile rows, in/N], weight [out, in/N]); starts
        its sum over ranks without waiting for it."""
        start, stop = self.bounds[index]
        part = self.out[start:stop]  # rows of a contiguous buffer: contiguous, as collectives need
        torch.mm(rows, weight.t(), out=part)
        if self._skip:
            return
        if self._exchange is not None:
            self._works[index] = self._exchange.push(part, self._inbox, start, index, self._sequence)
        else:
            self._works[index] = dist.all_reduce(part, async_op=True)

    def tile(self, index: int) -> torch.Tensor:
        """Tile `index` summed over ranks, in place (for work queued next on the current stream)."""
        start, stop = self.bounds[index]
        part = self.out[start:stop]
        work, self._works[index] = self._works[index], None
        if self._exchange is not None and work is not None:
            torch.cuda.current_stream().wait_event(work)  # this rank's push has read the partial
            return self._pair_sum(index, out=part)
        if work is not None:
            work.wait()  # on NCCL, only makes the current stream wait for the collective's stream
        return part

    def finish(self, index: int, *, residual: torch.Tensor, norm=None, bias=None, out=None):
        """h = tile `index` summed over ranks (+ bias) + residual, into `out` if given; with
        `norm` (an RMSNorm) returns (norm(h), h), else h. Through the copy engines the sum, the
        residual add and the norm are one kernel that reads the peer's partial in place."""
        if self._exchange is None or bias is not None or self._works[index] is None:
            summed = self.tile(index)
            summed = summed if bias is None else summed + bias
            if norm is not None:
                normed, h = norm(summed, residual)
                return normed, (h if out is None else out.copy_(h))
            return torch.add(summed, residual, out=out)
        self._works[index] = None
        return self._pair_sum(index, residual=residual, norm=norm, out=out)

    def _pair_sum(self, index: int, **kwargs):
        start, stop = self.bounds[index]
        own, received = self.out[start:stop], self._exchange.received(self._inbox, start, stop)
        first, second = (own, received) if self.ctx.rank == 0 else (received, own)
        norm = kwargs.pop("norm", None)
        if norm is not None:
            kwargs.update(norm_weight=norm.weight, eps=norm.eps)
        return elementwise.pair_sum(first, second, flag=self._exchange.flag(self._inbox, index),
                                    sequence=self._sequence, **kwargs)

    def wait_all(self) -> torch.Tensor:
        for index in range(len(self.bounds)):
            self.tile(index)
        return self.out


def start_row_parallel(rows: torch.Tensor, weight: torch.Tensor, ctx: ParallelContext,
                       bounds: list[tuple[int, int]]) -> PendingRows:
    """rows [R, in/N] @ weight[out, in/N]^T tile by tile (`bounds`), each tile's sum over ranks
    started right after its GEMM; returns without waiting for any of them."""
    pending = PendingRows(rows.shape[0], weight.shape[0], rows, ctx, bounds)
    for index, (start, stop) in enumerate(bounds):
        pending.compute(index, rows[start:stop], weight)
    return pending


def _copy_engine_exchange(count: int, features: int, like: torch.Tensor, bounds, ctx: ParallelContext):
    """The copy-engine exchange for a [count, features] output like `like`, or None where
    all_reduce sums it (other settings, one tile, small tiles, GPUs that cannot map each
    other's memory, or a CUDA-graph capture, whose replays would repeat one sequence number)."""
    tile_rows = bounds[0][1] - bounds[0][0]
    if (ctx.settings.reduce_engine != "copy" or like.device.type != "cuda" or len(bounds) < 2
            or len(bounds) > copy_engine.MAX_TILES
            or tile_rows * features * like.element_size() < copy_engine.MIN_TILE_BYTES
            or torch.cuda.is_current_stream_capturing() or not copy_engine.usable(ctx.world_size)):
        return None
    return copy_engine.exchange_for(count, features, like.dtype, like.device)


RELAY_LEAD_TILES = 1  # the accumulator's own-buffer tiles, computed while the first partial travels


def _relayed(rows: torch.Tensor, weight: torch.Tensor, exchange, bounds, ctx: ParallelContext) -> torch.Tensor:
    """rows @ weight^T summed over the two ranks by relay (facli.parallel.copy_engine): the
    sender pushes partial tiles, the accumulator adds its product onto each in its GEMM and
    pushes the sum back; the ranks swap roles every projection. Returns the sums [count, out],
    a view of this rank's inbox, valid until the projection after next; both ranks hold the
    same bits."""
    inbox, sequence = exchange.begin()
    count, features = rows.shape[0], weight.shape[0]
    summed = exchange.received(inbox, 0, count)
    if ctx.rank == sequence % 2:  # this projection's sender
        own = torch.empty(count, features, dtype=rows.dtype, device=rows.device)
        for index, (start, stop) in enumerate(bounds):
            torch.mm(rows[start:stop], weight.t(), out=own[start:stop])
            pushed = exchange.push(own[start:stop], inbox, start, index, sequence)
        torch.cuda.current_stream().wait_event(pushed)  # the side stream has read `own`, in order
        for index in range(len(bounds)):
            exchange.wait(inbox, index, sequence)
        return summed
    cut = max(0, len(bounds) - RELAY_LEAD_TILES)
    lead_start = bounds[cut][0]
    own = torch.empty(count - lead_start, features, dtype=rows.dtype, device=rows.device)
    for start, stop in bounds[cut:]:
        torch.mm(rows[start:stop], weight.t(), out=own[start - lead_start:stop - lead_start])
    for index, (start, stop) in enumerate(bounds[:cut]):
        exchange.wait(inbox, index, sequence)
        summed[start:stop].addmm_(rows[start:stop], weight.t())  # the sender's partial + ours
        exchange.push(summed[start:stop], inbox, start, index, sequence)
    for index, (start, stop) in enumerate(bounds[cut:], start=cut):
        elementwise.pair_sum(summed[start:stop], own[start - lead_start:stop - lead_start],
                             flag=exchange.flag(inbox, index), sequence=sequence, out=summed[start:stop])
        exchange.push(summed[start:stop], inbox, start, index, sequence)
    return summed
