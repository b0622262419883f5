"""Two GPU ranks exchanging row-parallel tiles through the copy engines instead of NCCL's kernels.

NCCL's all_reduce runs as a kernel that needs SMs for the whole transfer; while cuBLAS's GEMMs
fill every SM, that kernel waits, and tiling-AllReduce hides little (benchmarks/tensor_parallel.py,
docs/performance.md). Here no SM takes part in moving a tile: on a high-priority side stream, a rank
copies a tile into the peer's inbox, a buffer in torch.distributed symmetric memory mapped into
both ranks' address spaces (a device-to-device copy, which the copy engines run over NVLink),
then writes the tile's flag in the peer's memory with cuStreamWriteValue32, which the GPU's
front end executes after a system-wide fence.

The two ranks relay each projection's tiles (facli.parallel.comm.RelayedRows, the default), so
that no kernel re-reads the partials to sum them: the sender pushes its partial tiles into the
accumulator's inbox; the accumulator's front end waits for each tile's flag
(cuStreamWaitValue32, no SM), its GEMM adds its own product onto the received partial in place
(cuBLAS with beta = 1, one rounding of the float32 sum), and it pushes the sum back into the
sender's inbox. Both ranks then read the same sums from their inboxes. When a projection's
tiles are computed all at once, the accumulator first computes the last tile into a buffer of
its own while the first partial travels, and sums that one with pair_sum; when they come one by
one (the tile-by-tile layer tail), it runs each tile's GEMM a call later. The ranks swap roles
every projection: the accumulator holds the sums one push before the sender does, so it starts
the next projection first, and as its sender, so the partials are on their way when the other
rank gets there.

Otherwise (TensorParallelSettings.relay_sums False) both ranks push their partials, and the
kernel that consumes a tile sums it (facli.kernels.elementwise.pair_sum): it waits on the
tile's flag, adds rank 0's and rank 1's partials in that order, so both ranks hold
bit-identical sums, and folds in the residual add and RMSNorm that follow the projection.

A rank never waits for the peer before pushing, so the inboxes must not be overwritten too
early: there are two inboxes, each as large as a whole projection output, used by alternating
row-parallel projections (o_proj, down_proj, o_proj, ...). A rank pushes into an inbox again
only two projections later, and the input of the projection in between depends on the sum it
read from that inbox, which its peer cannot have pushed before reading its own copy. (The
two-wave prefill keeps four projections in flight and so asks for four inboxes:
facli.parallel.waves.) Flags hold the projection's sequence number, so they never need
resetting.
"""

import ctypes
import functools
import os
import warnings

import torch
import torch.distributed as dist

from facli.planner.policy import COPY_ENGINE_INBOXES, COPY_ENGINE_RANKS

MAX_TILES = 4096  # flags per inbox
MIN_TILE_BYTES = 1 << 20  # below this NCCL's latency wins; decode steps stay on NCCL


class CopyEngineExchange:
    """This rank's inboxes [inboxes, capacity, cols] and flags, the peer's mapped into this
    rank's address space, and the side stream that pushes tiles."""

    def __init__(self, capacity: int, cols: int, dtype: torch.dtype, device: torch.device,
                 inboxes: int = COPY_ENGINE_INBOXES):
        from torch.distributed import _symmetric_memory as symm_mem

        with warnings.catch_warnings():  # required before torch 2.12, deprecated since
            warnings.simplefilter("ignore", FutureWarning)
            symm_mem.enable_symm_mem_for_group(dist.group.WORLD.group_name)
        peer = 1 - dist.get_rank()
        self.capacity, self.inboxes = capacity, inboxes
        self.inbox = symm_mem.empty(inboxes, capacity, cols, dtype=dtype, device=device)
        self.flags = symm_mem.empty(inboxes, MAX_TILES, dtype=torch.uint32, device=device)
        self.flags.zero_()
        torch.cuda.synchronize(device)  # zeroed before the peer can see the flags
        inbox_handle = symm_mem.rendezvous(self.inbox, dist.group.WORLD)
        flags_handle = symm_mem.rendezvous(self.flags, dist.group.WORLD)
        self.peer_inbox = inbox_handle.get_buffer(peer, tuple(self.inbox.shape), dtype, 0)
        self.peer_flags = flags_handle.get_buffer(peer, (inboxes * MAX_TILES,), torch.uint32, 0)
        self.stream = torch.cuda.Stream(device, priority=-1)
        self.projections = 0

    def begin(self) -> tuple[int, int]:
        """(inbox, sequence number) of the next row-parallel projection; every rank calls this
        once per projection, in the same order."""
        self.projections += 1
        return self.projections % self.inboxes, self.projections

    def push(self, part: torch.Tensor, inbox: int, start: int, tile: int, sequence: int) -> torch.cuda.Event:
        """Copy part [rows, cols] into the peer's inbox at rows start.., then raise the peer's
        flag of `tile`, on the side stream after the work queued so far on the current stream
        (the tile's GEMM). Returns the event after which part may be overwritten."""
        part.record_stream(self.stream)  # read here, allocated and freed on the caller's stream
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            self.peer_inbox[inbox, start:start + part.shape[0]].copy_(part)
            torch._C._distributed_c10d._SymmetricMemory.stream_write_value32(
                self.peer_flags, inbox * MAX_TILES + tile, sequence)
            pushed = torch.cuda.Event()
            pushed.record(self.stream)
        return pushed

    def wait(self, inbox: int, tile: int, sequence: int) -> None:
        """Make the current stream wait, in the GPU's front end, until the peer has raised this
        rank's flag of `tile` for projection `sequence` (its push has landed)."""
        flag = self.flags[inbox, tile:tile + 1]
        result = _stream_wait_value32()(torch.cuda.current_stream(flag.device).cuda_stream,
                                        flag.data_ptr(), sequence, _WAIT_GEQ)
        if result != 0:
            raise RuntimeError(f"cuStreamWaitValue32 failed with CUresult {result}")

    def received(self, inbox: int, start: int, stop: int) -> torch.Tensor:
        """The peer's partial rows start..stop in this rank's inbox (valid once flagged)."""
        return self.inbox[inbox, start:stop]

    def flag(self, inbox: int, tile: int) -> torch.Tensor:
        """The flag of `tile` in this rank's inbox, as a one-element int32 tensor."""
        return self.flags.view(torch.int32)[inbox, tile:tile + 1]


_WAIT_GEQ = 0x0  # CU_STREAM_WAIT_VALUE_GEQ: (int32)(*addr - value) >= 0, safe across wrap-around


@functools.cache
def _stream_wait_value32():
    """The CUDA driver's cuStreamWaitValue32 (PyTorch binds the write but not the wait)."""
    driver = ctypes.CDLL("libcuda.so.1")
    wait = getattr(driver, "cuStreamWaitValue32_v2", None) or driver.cuStreamWaitValue32
    wait.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint]
    wait.restype = ctypes.c_int
    return wait


_EXCHANGES: dict[tuple, CopyEngineExchange] = {}
_USABLE: dict[int, bool] = {}


def usable(world: int) -> bool:
    """Whether `world` ranks, one per GPU 0..world-1 of this host, exchange tiles this way:
    two ranks on one host whose GPUs are peer-accessible (NVLink or PCIe P2P). Every rank
    computes the same answer from the same matrix, so all of them choose the same engine."""
    if world != COPY_ENGINE_RANKS:
        return False
    if world not in _USABLE:
        count = torch.cuda.device_count()
        one_host = int(os.environ.get("LOCAL_WORLD_SIZE", world)) == world and count >= world
        _USABLE[world] = one_host and all(
            torch.cuda.can_device_access_peer(a, b) for a in range(world) for b in range(world) if a != b)
    return _USABLE[world]


def exchange_for(rows: int, cols: int, dtype: torch.dtype, device: torch.device,
                 inboxes: int = COPY_ENGINE_INBOXES) -> CopyEngineExchange:
    """The process's exchange with `inboxes` inboxes for projection outputs of `rows` x `cols`,
    created on first use and replaced by a larger one when a longer chunk comes (every rank
    reaches this in the same order, as rendezvous is collective)."""
    key = (device, cols, dtype, inboxes)
    current = _EXCHANGES.get(key)
    if current is None or current.capacity < rows:
        if current is not None:
            torch.cuda.synchronize(device)  # neither rank has a push in flight into the old inboxes
            dist.barrier()
        _EXCHANGES[key] = current = CopyEngineExchange(rows, cols, dtype, device, inboxes)
    return current
