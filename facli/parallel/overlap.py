"""Tiling-AllReduce across a decoder layer's tail: o_proj, residual, norm, MLP, residual.

The MLP works on each token alone, so once tile i of the attention output is summed over ranks,
tile i's MLP can run while the all_reduces of later tiles are still in flight: the attention's
all_reduce overlaps the MLP's first GEMMs (gate/up), which a whole-sequence MLP must wait for.
Each tile's down_proj all_reduce then overlaps the next tile's MLP; only the last tile's
down_proj all_reduce is left exposed. With one token (decode at batch 1) there is nothing to
overlap: the RMSNorm before the MLP needs the attention output summed over all ranks.
"""

import torch

from facli.parallel import comm
from facli.parallel.context import ParallelContext


def pipelines(ctx: ParallelContext, x: torch.Tensor) -> bool:
    """Whether the layer tail of x [B, T, H] runs tile by tile."""
    if not (ctx.is_distributed and ctx.settings.overlap_mlp):
        return False
    return len(comm.tile_bounds(x.shape[0] * x.shape[1], ctx)) > 1


def layer_tail(x: torch.Tensor, attn: torch.Tensor, o_proj, post_norm, mlp,
               ctx: ParallelContext) -> torch.Tensor:
    """h = x + o_proj(attn); returns h + mlp(post_norm(h)), tile by tile over tokens.

    x [B, T, H] is the layer input (the residual), attn [B, T, Hq*D/N] this rank's attention
    heads before o_proj. Same result as the sequential layer, row for row.
    """
    assert mlp.down_proj.bias is None
    rows = x.reshape(-1, x.shape[-1])
    bounds = comm.tile_bounds(rows.shape[0], ctx)
    attended = comm.start_row_parallel(attn.reshape(-1, attn.shape[-1]), o_proj.weight, ctx, bounds)
    hidden, downs = [], []
    for index, (start, stop) in enumerate(bounds):
        summed = attended.tile(index)
        normed, h = post_norm(rows[start:stop], summed if o_proj.bias is None else summed + o_proj.bias)
        inner = mlp.inner(normed)
        downs.append(comm.start_row_parallel(inner, mlp.down_proj.weight, ctx, [(0, stop - start)]))
        hidden.append(h)
    out = torch.empty_like(rows)
    for index, (start, stop) in enumerate(bounds):
        torch.add(hidden[index], downs[index].tile(0), out=out[start:stop])
    return out.view_as(x)
