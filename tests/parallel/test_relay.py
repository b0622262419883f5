"""The relay's schedule (facli.parallel.comm.RelayedRows) on CPU: two ranks as two threads
over an in-memory stand-in for the copy-engine exchange, so CI checks which tiles each rank
sends, accumulates and sums, and that both ranks end with the same sums, without GPUs."""

import pytest
import torch
from thread_ranks import FakeExchange, _Link, _run_ranks, serial_pair_sum  # noqa: F401 - a fixture

from facli.parallel import comm
from facli.parallel.context import ParallelContext, TensorParallelSettings


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
