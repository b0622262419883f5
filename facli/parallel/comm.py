"""Every collective facli uses goes through this module; world size 1 never touches torch.distributed."""

import torch
import torch.distributed as dist

from facli.kernels import elementwise, gemv
from facli.parallel import copy_engine
from facli.parallel.context import ParallelContext
from facli.planner import policy


def all_reduce_sum(tensor: torch.Tensor, parallel: ParallelContext) -> torch.Tensor:
    """Sum `tensor` over ranks, in place; returns it."""
    if parallel.is_distributed:
        dist.all_reduce(tensor)
    return tensor


def all_gather_last_dim(tensor: torch.Tensor, parallel: ParallelContext) -> torch.Tensor:
    """Concatenate each rank's `tensor` along its last dimension, in rank order."""
    if not parallel.is_distributed:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(parallel.world_size)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=-1)


def broadcast_tokens(tokens: torch.Tensor, parallel: ParallelContext) -> torch.Tensor:
    """Make every rank hold rank 0's sampled `tokens` (any shape, integer); returns them.

    All ranks must agree on each sampled token or their KV caches diverge; broadcasting rank 0's
    choice is exact whatever the sampler does.
    """
    if not parallel.is_distributed:
        return tokens
    tokens = tokens.contiguous()
    dist.broadcast(tokens, src=0)
    return tokens


def barrier(parallel: ParallelContext) -> None:
    """Wait until every rank gets here."""
    if parallel.is_distributed:
        dist.barrier()


def row_parallel_linear(x: torch.Tensor, weight: torch.Tensor, parallel: ParallelContext,
                        bias: torch.Tensor | None = None,
                        residual: torch.Tensor | None = None) -> torch.Tensor:
    """sum over ranks of x W^T (+ bias once) (+ residual [..., out]): x [..., in/N] and weight
    [out, in/N] -> [..., out].

    With parallel.settings.tile_tokens set and at least two tiles of tokens, the output is computed
    tile by tile along the token dimension into one preallocated buffer and each tile's
    all_reduce is launched asynchronously as soon as its GEMM is done, so it runs while the next
    tile's GEMM computes (tiling-AllReduce). On NCCL the collectives run on NCCL's own stream;
    on gloo on its worker threads. Every element is reduced exactly as by one all_reduce.
    Through the copy engines the two ranks relay the tiles instead (facli.parallel.copy_engine):
    the sum is rounded once, and the result is a view of the exchange's inbox, valid until the
    projection after next.
    """
    if not parallel.is_distributed:
        return gemv.linear(x, weight, bias, residual)
    rows = x.reshape(-1, x.shape[-1])
    out = start_row_parallel(rows, weight, parallel, tile_bounds(rows.shape[0], parallel)).wait_all()
    out = out.view(*x.shape[:-1], weight.shape[0])
    out = out if bias is None else out + bias
    return out if residual is None else out + residual


def tile_bounds(count: int, parallel: ParallelContext) -> list[tuple[int, int]]:
    """Token ranges of the AllReduce tiles for `count` tokens: one range unless two tiles fit."""
    return policy.tile_bounds(count, parallel.settings.tile_tokens)


class PendingRows:
    """A row-parallel output [rows, out] computed tile by tile (`bounds`), each tile's sum over
    ranks started as soon as its GEMM is queued (`compute`) and read back by `tile` or `finish`.

    NCCL sums each tile with an asynchronous all_reduce. Between two peer GPUs with
    parallel.settings.reduce_engine "copy", each rank pushes its partial tile to the peer with the
    copy engines, and the kernel that reads the tile adds the two partials (copy_engine). That
    kernel waits for the peer's flag itself, or with `front_end_wait` the stream waits before
    launching it (for tiles read long after their push: no program spins, none needs an
    acquire of the flag)."""

    def __init__(self, count: int, features: int, like: torch.Tensor, parallel: ParallelContext,
                 bounds, exchange=None, front_end_wait: bool = False):
        self.out = torch.empty(count, features, dtype=like.dtype, device=like.device)
        self.bounds, self.parallel, self._front_end_wait = bounds, parallel, front_end_wait
        self._works: list = [None] * len(bounds)
        self._skip = not parallel.is_distributed
        self._exchange = exchange
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
            return _add_residual(self.tile(index), residual, norm, bias, out)
        self._works[index] = None
        return self._pair_sum(index, residual=residual, norm=norm, out=out)

    def _pair_sum(self, index: int, **kwargs):
        start, stop = self.bounds[index]
        own, received = self.out[start:stop], self._exchange.received(self._inbox, start, stop)
        first, second = (own, received) if self.parallel.rank == 0 else (received, own)
        norm = kwargs.pop("norm", None)
        if norm is not None:
            kwargs.update(norm_weight=norm.weight, eps=norm.eps)
        if self._front_end_wait:
            self._exchange.wait(self._inbox, index, self._sequence)
            return elementwise.pair_sum(first, second, **kwargs)
        return elementwise.pair_sum(first, second, flag=self._exchange.flag(self._inbox, index),
                                    sequence=self._sequence, **kwargs)

    def wait_all(self) -> torch.Tensor:
        for index in range(len(self.bounds)):
            self.tile(index)
        return self.out


class RelayedRows:
    """A row-parallel output [rows, out] summed over two ranks by relay through the copy engines
    (facli.parallel.copy_engine), tile by tile (`bounds`): this projection's sender pushes its
    partial tiles; the accumulator's GEMM adds its product onto each received partial in place
    and pushes the sum back; the ranks swap roles every projection. Same interface as
    PendingRows; the sums are views of this rank's inbox, valid until the projection after
    next, and both ranks hold the same bits."""

    def __init__(self, count: int, features: int, like: torch.Tensor, parallel: ParallelContext,
                 bounds, exchange):
        self.bounds, self._exchange = bounds, exchange
        self._inbox, self._sequence = exchange.begin()
        self.sender = parallel.rank == self._sequence % 2
        self._summed = exchange.received(self._inbox, 0, count)
        # The sender's partials; the accumulator's own is its lead tile's (compute_all).
        self._own = None
        if self.sender:
            self._own = torch.empty(count, features, dtype=like.dtype, device=like.device)
        self._pending = None  # the accumulator's last queued tile: its GEMM runs at the next call
        self._lead = None  # the accumulator's tile computed on its own, summed by pair_sum

    def compute_all(self, rows: torch.Tensor, weight: torch.Tensor) -> "RelayedRows":
        """Every tile of rows [R, in/N] @ weight^T. The accumulator first computes the last tile
        on its own, which keeps it busy while the sender's first partial travels."""
        tiles = list(enumerate(self.bounds))
        if not self.sender:
            self._lead, (start, stop) = tiles.pop()
            self._own = torch.mm(rows[start:stop], weight.t())
        for index, (start, stop) in tiles:
            self.compute(index, rows[start:stop], weight)
        self._accumulate_pending()
        return self

    def compute(self, index: int, rows: torch.Tensor, weight: torch.Tensor) -> None:
        """Tile `index` = rows @ weight^T. The sender computes and pushes it now; the
        accumulator runs it at its next call, when the sender's partial has had time to land."""
        start, stop = self.bounds[index]
        if self.sender:
            torch.mm(rows, weight.t(), out=self._own[start:stop])
            self._exchange.push(self._own[start:stop], self._inbox, start, index, self._sequence)
            return
        self._accumulate_pending()
        self._pending = (index, rows, weight)

    def _accumulate_pending(self) -> None:
        if self._pending is None:
            return
        (index, rows, weight), self._pending = self._pending, None
        start, stop = self.bounds[index]
        self._exchange.wait(self._inbox, index, self._sequence)
        self._summed[start:stop].addmm_(rows, weight.t())  # the sender's partial + ours
        self._exchange.push(self._summed[start:stop], self._inbox, start, index, self._sequence)

    def _sum_lead(self) -> None:
        index, self._lead = self._lead, None
        start, stop = self.bounds[index]
        elementwise.pair_sum(self._summed[start:stop], self._own, out=self._summed[start:stop],
                             flag=self._exchange.flag(self._inbox, index), sequence=self._sequence)
        self._exchange.push(self._summed[start:stop], self._inbox, start, index, self._sequence)

    def tile(self, index: int) -> torch.Tensor:
        """Tile `index` summed over ranks (for work queued next on the current stream)."""
        start, stop = self.bounds[index]
        if self.sender:
            self._exchange.wait(self._inbox, index, self._sequence)
            return self._summed[start:stop]
        if self._pending is not None and self._pending[0] == index:
            self._accumulate_pending()
        if self._lead is not None and index > 0:
            self._sum_lead()  # by the second tile read, the sender's last partial has landed
        return self._summed[start:stop]

    def finish(self, index: int, *, residual: torch.Tensor, norm=None, bias=None, out=None):
        """As PendingRows.finish."""
        return _add_residual(self.tile(index), residual, norm, bias, out)

    def wait_all(self) -> torch.Tensor:
        for index in range(len(self.bounds)):
            self.tile(index)
        return self._summed


def _add_residual(summed, residual, norm, bias, out):
    """summed (+ bias) + residual into `out` if given; with `norm`, (norm(h), h)."""
    summed = summed if bias is None else summed + bias
    if norm is None:
        return torch.add(summed, residual, out=out)
    normed, h = norm(summed, residual)
    return normed, (h if out is None else out.copy_(h))


def pending_rows(count: int, features: int, like: torch.Tensor, parallel: ParallelContext, bounds):
    """An empty row-parallel output [count, features] like `like`, to compute tile by tile:
    relayed through the copy engines where they serve these tiles and parallel.settings.relay_sums,
    else summed by all_reduce or pair_sum (PendingRows)."""
    exchange = None
    if parallel.is_distributed:
        exchange = _copy_engine_exchange(count, features, like, bounds, parallel)
    if exchange is not None and parallel.settings.relay_sums:
        return RelayedRows(count, features, like, parallel, bounds, exchange)
    return PendingRows(count, features, like, parallel, bounds, exchange)


def start_row_parallel(rows: torch.Tensor, weight: torch.Tensor, parallel: ParallelContext,
                       bounds: list[tuple[int, int]]):
    """rows [R, in/N] @ weight[out, in/N]^T tile by tile (`bounds`), each tile's sum over ranks
    started right after its GEMM; returns without waiting for any of them."""
    pending = pending_rows(rows.shape[0], weight.shape[0], rows, parallel, bounds)
    if isinstance(pending, RelayedRows):
        return pending.compute_all(rows, weight)
    for index, (start, stop) in enumerate(bounds):
        pending.compute(index, rows[start:stop], weight)
    return pending


def _copy_engine_exchange(count: int, features: int, like: torch.Tensor, bounds,
                          parallel: ParallelContext):
    """The copy-engine exchange for a [count, features] output like `like`, or None where
    all_reduce sums it (other settings, one tile, small tiles, GPUs that cannot map each
    other's memory, or a CUDA-graph capture, whose replays would repeat one sequence number)."""
    tile_rows = bounds[0][1] - bounds[0][0]
    if (parallel.settings.reduce_engine != "copy" or like.device.type != "cuda" or len(bounds) < 2
            or len(bounds) > copy_engine.MAX_TILES
            or tile_rows * features * like.element_size() < copy_engine.MIN_TILE_BYTES
            or torch.cuda.is_current_stream_capturing() or not copy_engine.usable(parallel.world_size)):
        return None
    return copy_engine.exchange_for(count, features, like.dtype, like.device)
