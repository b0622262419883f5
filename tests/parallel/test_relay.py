"""The relay's schedule (facli.parallel.comm.RelayedRows) on CPU: two ranks as two threads
over an in-memory stand-in for the copy-engine exchange, so CI checks which tiles each rank
sends, accumulates and sums, and that both ranks end with the same sums, without GPUs."""

import threading

import pytest
import torch

from facli.kernels import elementwise
from facli.parallel import comm
from facli.parallel.context import ParallelContext, TensorParallelSettings

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


@pytest.mark.parametrize("count,tile", [(1500, 512), (777, 512), (4096, 512)])
@pytest.mark.parametrize("by_tile", [False, True])
def test_relay_gives_both_ranks_the_sum_of_both_products(count, tile, by_tile, serial_pair_sum):
    cols, inner, projections = 24, 16, 4  # both inboxes twice, each rank in both roles
    generator = torch.Generator().manual_seed(count + tile)
    rows = torch.randn(projections, 2, count, inner, dtype=torch.float64, generator=generator)
    weights = torch.randn(projections, 2, cols, inner, dtype=torch.float64, generator=generator)
    expected = rows[:, 0] @ weights[:, 0].transpose(1, 2) + rows[:, 1] @ weights[:, 1].transpose(1, 2)
    link = _Link(count, cols)
    bounds = [(start, min(start + tile, count)) for start in range(0, count, tile)]

    def rank_work(rank):
        parallel = ParallelContext(rank=rank, world_size=2,
                              settings=TensorParallelSettings(tile_tokens=tile, reduce_engine="copy"))
        exchange = FakeExchange(link, rank)
        sums, roles = [], []
        for p in range(projections):
            relayed = comm.RelayedRows(count, cols, rows[p, rank], parallel, bounds, exchange)
            if by_tile:  # as the tile-by-tile layer tail queues them
                for index, (start, stop) in enumerate(bounds):
                    relayed.compute(index, rows[p, rank, start:stop], weights[p, rank])
            else:
                relayed.compute_all(rows[p, rank], weights[p, rank])
            sums.append(relayed.wait_all().clone())
            roles.append("sender" if relayed.sender else "accumulator")
        return sums, roles, exchange.pushes

    (sums0, roles0, pushes0), (sums1, roles1, pushes1) = _run_ranks(rank_work)
    assert roles0 == ["accumulator", "sender"] * 2 and roles1 == ["sender", "accumulator"] * 2
    for p in range(projections):
        assert torch.equal(sums0[p], sums1[p])  # both ranks read the accumulator's bits
        # The lead tile goes through pair_sum, which sums in float32 under the Triton interpreter.
        torch.testing.assert_close(sums0[p], expected[p], rtol=1e-5, atol=1e-5)
    # Each tile crosses the link twice per projection: the sender's partial, the accumulator's sum.
    every_tile_once = sorted((p + 1, t) for p in range(projections) for t in range(len(bounds)))
    assert sorted(pushes0) == every_tile_once and sorted(pushes1) == every_tile_once
