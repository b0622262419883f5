"""Tiling-AllReduce across a whole decoder layer, tile by tile over the tokens of one sequence.

The queries of tile i attend to the keys of tiles 0..i (chunked prefill within the chunk), so
each tile's attention output goes through o_proj and its sum over ranks starts while the next
tile's attention computes: the attention's AllReduce hides behind attention itself. The MLP
works on each token alone, so once tile i's attention output is summed, tile i's norm and MLP
run while later tiles' sums are in flight, and each tile's down_proj sum overlaps the next
tile's MLP; only the last tile's down_proj sum is left exposed. With one token (decode at
batch 1) there is nothing to overlap: the RMSNorm before the MLP needs the attention output
summed over all ranks.
"""

import torch

from facli.parallel import comm
from facli.parallel.context import ParallelContext


def pipelines(ctx: ParallelContext, x: torch.Tensor) -> bool:
    """Whether the decoder layer runs tile by tile for x [B, T, H]: one sequence, two tiles."""
    if not (ctx.is_distributed and ctx.settings.overlap_mlp) or x.shape[0] != 1:
        return False
    return len(comm.tile_bounds(x.shape[1], ctx)) > 1


def decoder_layer(layer, x: torch.Tensor, cos, sin, kv, index: int, start: int) -> torch.Tensor:
    """facli.model.DecoderLayer's forward, tile by tile; the same result row for row.

    x [1, T, H] is the layer input at positions start..start+T; `layer` the DecoderLayer whose
    weights and context are used, `index` its number in the KV store.
    """
    ctx, attention, mlp = layer.ctx, layer.self_attn, layer.mlp
    assert mlp.down_proj.bias is None
    rows = x.reshape(-1, x.shape[-1])
    bounds = comm.tile_bounds(rows.shape[0], ctx)
    q, k, v = attention.project(layer.input_layernorm(x), cos, sin)
    attended = []
    for first, stop in bounds:
        heads = kv.attend(index, q[:, first:stop], k[:, first:stop], v[:, first:stop], start + first)
        attended.append(comm.start_row_parallel(heads.reshape(stop - first, -1), attention.o_proj.weight,
                                                ctx, [(0, stop - first)]))
    hidden, downs = [], []
    for (first, stop), pending in zip(bounds, attended):
        summed = pending.tile(0)
        if attention.o_proj.bias is not None:
            summed = summed + attention.o_proj.bias
        normed, h = layer.post_attention_layernorm(rows[first:stop], summed)
        downs.append(comm.start_row_parallel(mlp.inner(normed), mlp.down_proj.weight, ctx,
                                             [(0, stop - first)]))
        hidden.append(h)
    out = torch.empty_like(rows)
    for (first, stop), h, pending in zip(bounds, hidden, downs):
        torch.add(h, pending.tile(0), out=out[first:stop])
    return out.view_as(x)
