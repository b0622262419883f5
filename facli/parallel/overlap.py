"""Tiling-AllReduce across a decoder layer's tail: o_proj, residual, norm, MLP, residual.

The MLP works on each token alone, so once tile i of the attention output is summed over ranks,
tile i's MLP can run while the all_reduces of later tiles are still in flight: the attention's
all_reduce overlaps the MLP's first GEMMs (gate/up), which a whole-sequence MLP must wait for.
Each tile's down_proj all_reduce then overlaps the next tiles' MLPs (its sum is read two tiles
later, which leaves a relay's accumulator the time to add its product and push the sum back);
only the last tiles' down_proj sums are left exposed. With one token (decode at batch 1) there
is nothing to overlap: the RMSNorm before the MLP needs the attention output summed over all
ranks.
"""

import torch

from facli.parallel import comm
from facli.parallel.context import ParallelContext


DOWN_SUM_LAG = 2  # tiles between a down_proj tile's GEMM and the read of its sum


def pipelines(parallel: ParallelContext, x: torch.Tensor) -> bool:
    """Whether the layer tail of x [B, T, H] runs tile by tile."""
    if not (parallel.is_distributed and parallel.settings.overlap_mlp):
        return False
    return len(comm.tile_bounds(x.shape[0] * x.shape[1], parallel)) > 1


def layer_tail(x: torch.Tensor, attn: torch.Tensor, o_proj, post_norm, mlp,
               parallel: ParallelContext) -> torch.Tensor:
    """h = x + o_proj(attn); returns h + mlp(post_norm(h)), tile by tile over tokens.

    x [B, T, H] is the layer input (the residual), attn [B, T, Hq*D/N] this rank's attention
    heads before o_proj. Same result as the sequential layer, row for row. Tile i's down_proj
    sum is read once tile i + 2's MLP is queued, so it arrives while those MLPs compute.
    """
    assert mlp.down_proj.bias is None
    rows = x.reshape(-1, x.shape[-1])
    bounds = comm.tile_bounds(rows.shape[0], parallel)
    attended = comm.start_row_parallel(attn.reshape(-1, attn.shape[-1]), o_proj.weight, parallel,
                                       bounds)
    downs = comm.pending_rows(rows.shape[0], mlp.down_proj.weight.shape[0], rows, parallel, bounds)
    out = torch.empty_like(rows)
    hidden = []
    for index, (start, stop) in enumerate(bounds):
        normed, h = attended.finish(index, residual=rows[start:stop], norm=post_norm, bias=o_proj.bias)
        downs.compute(index, mlp.inner(normed), mlp.down_proj.weight)
        hidden.append(h)
        if index >= DOWN_SUM_LAG:
            _finish_down(downs, index - DOWN_SUM_LAG, hidden, out)
    for index in range(max(0, len(bounds) - DOWN_SUM_LAG), len(bounds)):
        _finish_down(downs, index, hidden, out)
    return out.view_as(x)


def _finish_down(downs, index: int, hidden: list, out: torch.Tensor) -> None:
    start, stop = downs.bounds[index]
    downs.finish(index, residual=hidden[index], out=out[start:stop])
    hidden[index] = None
