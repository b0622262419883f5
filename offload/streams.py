"""Copy queues for the KV store: one abstraction for CUDA streams and plain CPU execution.

On CUDA, `prefetch` (host-to-device) and `writeback` (device-to-host) are side streams, so a
copy in each direction can run on its own copy engine while the compute stream works. Events
order them. On any other device every method is a no-op and copies run inline, so the same
store code runs in CPU tests.
"""

import contextlib
import weakref

import torch


class CopyQueues:
    """Side streams and events on `device`; no-ops when device is not CUDA."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.prefetch = torch.cuda.Stream(self.device) if self.cuda else None
        self.writeback = torch.cuda.Stream(self.device) if self.cuda else None

    def on(self, stream):
        """Context that makes `stream` current (None: stay on the compute stream)."""
        if stream is None or not self.cuda:
            return contextlib.nullcontext()
        return torch.cuda.stream(stream)

    def mark(self, stream=None):
        """An event at the current end of `stream` (default: the compute stream)."""
        if not self.cuda:
            return None
        event = torch.cuda.Event()
        event.record(stream or torch.cuda.current_stream(self.device))
        return event

    def wait(self, events, stream=None) -> None:
        """Make `stream` (default: the compute stream) wait for every event in `events`."""
        if not self.cuda:
            return
        target = stream or torch.cuda.current_stream(self.device)
        for event in events:
            if event is not None:
                target.wait_event(event)

    def host_wait(self, event) -> None:
        """Block the calling thread until `event` has happened on the GPU."""
        if event is not None:
            event.synchronize()

    def keep(self, tensor: torch.Tensor, stream) -> None:
        """Tell the caching allocator that `stream` still reads `tensor`."""
        if self.cuda and stream is not None:
            tensor.record_stream(stream)


def host_empty(shape, dtype: torch.dtype, pin: bool) -> torch.Tensor:
    """A CPU tensor, page-locked when `pin` (needs CUDA), for asynchronous copies.

    torch's pinned allocator rounds every request up to a power of two, which would waste up
    to half the host memory for a 256K cache with a few extra decode positions; so the memory
    is allocated plainly and registered with the driver instead, and unregistered when freed.
    """
    tensor = torch.empty(shape, dtype=dtype)
    if not pin or tensor.numel() == 0:
        return tensor
    pointer, size = tensor.data_ptr(), tensor.numel() * tensor.element_size()
    try:
        cudart = torch.cuda.cudart()
        registered = int(cudart.cudaHostRegister(pointer, size, 0)) == 0
    except (AttributeError, RuntimeError):
        registered = False
    if not registered:
        return torch.empty(shape, dtype=dtype, pin_memory=True)
    weakref.finalize(tensor, cudart.cudaHostUnregister, pointer)
    return tensor


def pinned_copy(tensor: torch.Tensor, pin: bool) -> torch.Tensor:
    """A host copy of `tensor`; pinned and queued asynchronously when `pin`."""
    if tensor.device.type == "cpu" and not pin:
        return tensor
    out = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=pin)
    out.copy_(tensor, non_blocking=pin)
    return out
