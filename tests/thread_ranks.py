"""Two tensor-parallel ranks as two threads over an in-memory stand-in for the copy-engine
exchange, shared by the relay and two-wave tests."""

import threading

import pytest
import torch

from facli.kernels import elementwise

TIMEOUT_S = 10.0


@pytest.fixture
def serial_pair_sum(monkeypatch):
    """The Triton interpreter, which runs pair_sum on CPU, is not thread-safe: one call at a time."""
    interpreter, pair_sum = threading.Lock(), elementwise.pair_sum

    def one_at_a_time(*args, **kwargs):
        with interpreter:
            return pair_sum(*args, **kwargs)

    monkeypatch.setattr(elementwise, "pair_sum", one_at_a_time)


class _Link:
    """What the two ranks share: each rank's inboxes and the flags raised in them."""

    def __init__(self, capacity: int, cols: int, inboxes: int = 2, dtype=torch.float64):
        self.inboxes = [torch.full((inboxes, capacity, cols), float("nan"), dtype=dtype) for _ in range(2)]
        self.flags: dict = {}
        self.lock = threading.Lock()

    def flag(self, rank: int, inbox: int, tile: int, sequence: int) -> threading.Event:
        with self.lock:
            return self.flags.setdefault((rank, inbox, tile, sequence), threading.Event())


class FakeExchange:
    """CopyEngineExchange's interface; a push lands at once, a wait blocks the thread."""

    def __init__(self, link: _Link, rank: int):
        self.link, self.rank, self.projections = link, rank, 0
        self.pushes: list = []

    def begin(self):
        self.projections += 1
        return self.projections % len(self.link.inboxes[self.rank]), self.projections

    def push(self, part, inbox, start, tile, sequence):
        peer = 1 - self.rank
        self.link.inboxes[peer][inbox, start:start + part.shape[0]] = part
        self.link.flag(peer, inbox, tile, sequence).set()
        self.pushes.append((sequence, tile))
        return (sequence, tile)  # stands for the CUDA event: the partial may be overwritten

    def wait(self, inbox, tile, sequence):
        if not self.link.flag(self.rank, inbox, tile, sequence).wait(TIMEOUT_S):
            raise TimeoutError(f"rank {self.rank}: tile {tile} of projection {sequence} never landed")

    def flag(self, inbox, tile):
        # pair_sum's CPU reference does not wait on the flag: wait here for the latest projection
        # begun in this inbox.
        self.wait(inbox, tile, self.projections - (self.projections - inbox) % len(self.link.inboxes[self.rank]))
        return None

    def received(self, inbox, start, stop):
        return self.link.inboxes[self.rank][inbox, start:stop]


def _run_ranks(work):
    """work(rank) on two threads; returns their results, re-raising the first failure."""
    results, errors = [None, None], []

    def run(rank):
        try:
            results[rank] = work(rank)
        except Exception as exc:  # noqa: BLE001 - handed to the test thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(4 * TIMEOUT_S)
    if errors:
        raise errors[0]
    return results
