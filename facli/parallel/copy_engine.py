"""Summing row-parallel tiles over ranks with the GPUs' copy engines instead of NCCL's kernels.

NCCL's all_reduce runs as a kernel that needs SMs for the whole transfer; while cuBLAS's GEMMs
fill every SM, that kernel waits, and tiling-AllReduce hides little (docs/benchmarks.md, tensor
parallelism). Here, on a high-priority side stream, each rank pushes its partial tile into every
peer's inbox, a buffer in torch.distributed symmetric memory mapped into all ranks' address
spaces, with device-to-device copies that the copy engines run over NVLink without any SM; a
one-block barrier kernel then waits until every rank's pushes have landed, and each rank adds
the partial tiles. Only the barrier and the adds take SMs, for microseconds.

Every rank adds the same partial tiles in rank order (for two ranks, IEEE addition commutes), so
all ranks hold bit-identical sums, as tensor parallelism needs.

Inbox slots are reused round-robin. A peer pushes use j + SLOTS into a slot only after passing
the barrier of use j + SLOTS - 1, which this rank reaches only after its adds of use j (its side
stream runs in order), so with two or more slots a tile is never overwritten before it is read.
"""

import os
import warnings

import torch
import torch.distributed as dist

SLOTS = 2
MIN_TILE_BYTES = 1 << 20  # below this NCCL's latency wins; decode steps stay on NCCL
_BARRIER_TIMEOUT_MS = 600_000  # a rank that never arrives traps the kernel instead of hanging


class CopyEngineReducer:
    """Symmetric inboxes [SLOTS, world - 1, rows, cols] and the side stream that sums tiles."""

    def __init__(self, rows: int, cols: int, dtype: torch.dtype, device: torch.device):
        from torch.distributed import _symmetric_memory as symm_mem

        with warnings.catch_warnings():  # required before torch 2.12, deprecated since
            warnings.simplefilter("ignore", FutureWarning)
            symm_mem.enable_symm_mem_for_group(dist.group.WORLD.group_name)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.rows, self.cols, self.dtype = rows, cols, dtype
        self.inbox = symm_mem.empty(SLOTS, self.world - 1, rows, cols, dtype=dtype, device=device)
        self.handle = symm_mem.rendezvous(self.inbox, dist.group.WORLD)
        self.stream = torch.cuda.Stream(device, priority=-1)
        self.uses = 0
        self._views: dict[tuple, torch.Tensor] = {}

    def start_sum(self, part: torch.Tensor) -> torch.cuda.Event:
        """Replace part [rows, cols] (this rank's partial tile) by its sum over ranks, on the side
        stream after the work queued so far on the current stream (the tile's GEMM). Returns the
        event after which part holds the sum."""
        slot = self.uses % SLOTS
        self.uses += 1
        rows = part.shape[0]
        part.record_stream(self.stream)  # summed here, allocated and freed on the caller's stream
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            for peer in range(self.world):
                if peer != self.rank:
                    self._inbox(peer, self.rank, slot, rows).copy_(part)  # the copy engine, over NVLink
            self.handle.barrier(channel=0, timeout_ms=_BARRIER_TIMEOUT_MS)
            terms = [part if rank == self.rank else self._inbox(self.rank, rank, slot, rows)
                     for rank in range(self.world)]
            if self.world == 2:
                part.add_(terms[1 - self.rank])
            else:
                total = terms[0] + terms[1]
                for term in terms[2:]:
                    total += term
                part.copy_(total)
            done = torch.cuda.Event()
            done.record(self.stream)
        return done

    def _inbox(self, owner: int, sender: int, slot: int, rows: int) -> torch.Tensor:
        """Where `sender` puts its tile for `owner` in `slot`, as a [rows, cols] tensor."""
        key = (owner, sender, slot, rows)
        if key not in self._views:
            index = sender if sender < owner else sender - 1
            offset = (slot * (self.world - 1) + index) * self.rows * self.cols
            if owner == self.rank:
                self._views[key] = self.inbox.view(-1)[offset:offset + rows * self.cols].view(rows, self.cols)
            else:
                self._views[key] = self.handle.get_buffer(owner, (rows, self.cols), self.dtype, offset)
        return self._views[key]


_REDUCERS: dict[tuple, CopyEngineReducer] = {}
_USABLE: dict[int, bool] = {}


def usable(world: int) -> bool:
    """Whether `world` ranks, one per GPU 0..world-1 of this host, can map each other's memory:
    all on one host and every pair of GPUs peer-accessible (NVLink or PCIe P2P). Every rank
    computes the same answer from the same matrix, so all of them choose the same engine."""
    if world not in _USABLE:
        count = torch.cuda.device_count()
        one_host = int(os.environ.get("LOCAL_WORLD_SIZE", world)) == world and count >= world
        _USABLE[world] = one_host and all(
            torch.cuda.can_device_access_peer(a, b) for a in range(world) for b in range(world) if a != b)
    return _USABLE[world]


def reducer_for(rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> CopyEngineReducer:
    """The process's reducer for tiles of up to `rows` x `cols` (created on first use: every rank
    reaches this in the same order, as rendezvous is collective)."""
    key = (device, rows, cols, dtype)
    if key not in _REDUCERS:
        _REDUCERS[key] = CopyEngineReducer(rows, cols, dtype, device)
    return _REDUCERS[key]
