"""Summing row-parallel tiles over ranks with the GPUs' copy engines instead of NCCL's kernels.

NCCL's all_reduce runs as a kernel that needs SMs for the whole transfer; while cuBLAS's GEMMs
fill every SM, that kernel waits, and tiling-AllReduce hides little (docs/benchmarks.md, tensor
parallelism). Here each rank's GEMM writes its tile into a slot of a buffer in torch.distributed
symmetric memory (mapped into every rank's address space); on a side stream, a one-block barrier
kernel waits until every rank's tile is there, then each rank pulls the other ranks' tiles with
device-to-device copies, which the copy engines run over NVLink without any SM, and adds them.
Only the barrier and the adds take SMs, for microseconds.

Every rank adds the same partial tiles in rank order (for two ranks, IEEE addition commutes), so
all ranks hold bit-identical sums, as tensor parallelism needs.

Slots are reused round-robin. Use j's barrier also proves that every peer finished pulling use
j - 1 (its side stream is in order), so the slot of use j - 1 may be written again after it; with
three slots the GEMM of use j + 1 never waits on the barrier of use j.
"""

import warnings

import torch
import torch.distributed as dist

SLOTS = 3
MIN_TILE_BYTES = 1 << 20  # below this NCCL's latency wins; decode steps stay on NCCL
_BARRIER_TIMEOUT_MS = 600_000  # a rank that never arrives traps the kernel instead of hanging


class CopyEngineReducer:
    """A symmetric [SLOTS, rows, cols] buffer and the side stream that sums its tiles."""

    def __init__(self, rows: int, cols: int, dtype: torch.dtype, device: torch.device):
        from torch.distributed import _symmetric_memory as symm_mem

        self.rows, self.cols = rows, cols
        with warnings.catch_warnings():  # required before torch 2.12, deprecated since
            warnings.simplefilter("ignore", FutureWarning)
            symm_mem.enable_symm_mem_for_group(dist.group.WORLD.group_name)
        self.buffer = symm_mem.empty(SLOTS, rows, cols, dtype=dtype, device=device)
        self.handle = symm_mem.rendezvous(self.buffer, dist.group.WORLD)
        self.rank, self.world = self.handle.rank, self.handle.world_size
        self.stream = torch.cuda.Stream(device, priority=-1)
        self.scratch = torch.empty(rows, cols, dtype=dtype, device=device)
        self.uses = 0
        self.reusable = [None] * SLOTS  # event after which each slot may be written again

    def fits(self, rows: int) -> bool:
        return rows <= self.rows

    def claim(self, rows: int) -> tuple[int, torch.Tensor]:
        """The next slot as a [rows, cols] view for the GEMM to write, once every peer has
        finished reading the slot's previous tile (the current stream waits for that)."""
        slot = self.uses % SLOTS
        self.uses += 1
        if self.reusable[slot] is not None:
            torch.cuda.current_stream().wait_event(self.reusable[slot])
        return slot, self.buffer[slot, :rows]

    def start_sum(self, slot: int, out: torch.Tensor) -> torch.cuda.Event:
        """out [rows, cols] <- the sum over ranks of their tile in `slot`, on the side stream,
        after the work the current stream has queued so far (the GEMM into the slot). Returns
        the event that marks out as ready."""
        rows = out.shape[0]
        out.record_stream(self.stream)  # written here, allocated and freed on the caller's stream
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            self.handle.barrier(channel=0, timeout_ms=_BARRIER_TIMEOUT_MS)
            previous = (slot - 1) % SLOTS
            self.reusable[previous] = torch.cuda.Event()
            self.reusable[previous].record(self.stream)
            tiles = [self._tile(rank, slot, rows) for rank in range(self.world)]
            if self.world == 2:
                out.copy_(tiles[1 - self.rank])  # the copy engine, over NVLink
                out.add_(tiles[self.rank])
            else:
                self._sum_in_rank_order(tiles, out)
            done = torch.cuda.Event()
            done.record(self.stream)
        return done

    def _tile(self, rank: int, slot: int, rows: int) -> torch.Tensor:
        if rank == self.rank:
            return self.buffer[slot, :rows]
        offset = slot * self.rows * self.cols
        return self.handle.get_buffer(rank, (rows, self.cols), self.buffer.dtype, offset)

    def _sum_in_rank_order(self, tiles: list[torch.Tensor], out: torch.Tensor) -> None:
        scratch = self.scratch[: out.shape[0]]
        out.copy_(tiles[0])
        for rank in range(1, self.world):
            if rank == self.rank:
                out.add_(tiles[rank])
            else:
                scratch.copy_(tiles[rank])
                out.add_(scratch)


_REDUCERS: dict[tuple, CopyEngineReducer] = {}


def reducer_for(rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> CopyEngineReducer:
    """The process's reducer for tiles of up to `rows` x `cols` (created on first use: every rank
    reaches this in the same order, as rendezvous is collective)."""
    key = (device, rows, cols, dtype)
    if key not in _REDUCERS:
        _REDUCERS[key] = CopyEngineReducer(rows, cols, dtype, device)
    return _REDUCERS[key]
