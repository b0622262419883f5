"""Prefill in two waves: the two halves of a chunk take turns through each decoder layer, so
each half's row-parallel sums travel while the other half computes.

Per layer the compute stream runs, in order:

    A: input norm, q/k/v, attention, o_proj      -> A's o_proj sum started
    B: input norm, q/k/v, attention, o_proj      -> B's o_proj sum started
    A: o_proj sum + residual + norm, MLP, down   -> A's down_proj sum started
    B: o_proj sum + residual + norm, MLP, down   -> B's down_proj sum started

and the next layer's A starts from A's down_proj sum. Between the start of one half's sum and
its read stands the other half's attention or MLP, not only the GEMM before it, as with a
per-tile all_reduce. Only the last layer's B down_proj sum has nothing beside it. B attends to
A's keys, written to the cache first, so the result equals the one-pass layer row for row.

How a half is summed:
- With NCCL or gloo (more than two ranks, or GPUs without peer access), an asynchronous
  all_reduce, waited for where the half is read.
- Between two peer GPUs with the copy engines, both ranks push their whole partial to each
  other (facli.parallel.copy_engine); the stream waits for the peer's flag in the GPU's front
  end, then pair_sum, fused with the residual add and RMSNorm, adds the two in rank order. Four
  projections are in flight per layer, so the exchange has four inboxes: a rank pushes into an
  inbox again four projections later, and that projection's input depends on the peer's push of
  the projection two back, which the peer queued after summing what that inbox held.
"""

import torch

from facli.offload.device_cache import DeviceKVCache
from facli.parallel import comm, copy_engine
from facli.parallel.context import ParallelContext

INBOXES = 4  # projections in flight: o_proj and down_proj of each half


def applies(parallel: ParallelContext, x: torch.Tensor, kv) -> bool:
    """Whether the prefill of x [B, T, H] runs in two waves: parallel.settings.waves, more than one
    rank, a KV cache that holds every layer (DeviceKVCache), and a chunk that holds two tiles.
    A decode step (T = 1, however many rows) never does."""
    if not (parallel.is_distributed and parallel.settings.waves and isinstance(kv, DeviceKVCache)):
        return False
    if x.shape[1] == 1:
        return False
    if x.is_cuda and torch.cuda.is_current_stream_capturing():
        return False
    return len(comm.tile_bounds(x.shape[0] * x.shape[1], parallel)) >= 2


def exchange_for(parallel: ParallelContext, x: torch.Tensor):
    """The copy-engine exchange whose inboxes hold one half of x [B, T, H]; None where an
    asynchronous all_reduce sums each half instead (other engines, more ranks, halves under
    copy_engine.MIN_TILE_BYTES)."""
    batch, length, hidden = x.shape
    half_bytes = batch * (length // 2) * hidden * x.element_size()
    if (parallel.settings.reduce_engine != "copy" or not x.is_cuda
            or half_bytes < copy_engine.MIN_TILE_BYTES or not copy_engine.usable(parallel.world_size)):
        return None
    return copy_engine.exchange_for(batch * (length - length // 2), hidden, x.dtype, x.device,
                                    inboxes=INBOXES)


def run_layers(layers, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv, start: int,
               parallel: ParallelContext, exchange) -> torch.Tensor:
    """x [B, T, H] at positions start.. through every decoder layer, in two waves, the halves'
    partial sums pushed through `exchange` (exchange_for) or, with None, each started as an
    asynchronous all_reduce; returns the hidden states [B, T, H] after the last layer (before
    the final norm)."""
    batch, length, hidden = x.shape
    spans = ((0, length // 2), (length // 2, length))
    residual = [x[:, begin:stop].reshape(-1, hidden) for begin, stop in spans]
    downs = [None, None]
    for index, layer in enumerate(layers):
        attended = []
        for wave, (begin, stop) in enumerate(spans):
            if downs[wave] is None:
                normed = layer.input_layernorm(residual[wave])
            else:
                normed, residual[wave] = downs[wave].finish(0, residual=residual[wave],
                                                            norm=layer.input_layernorm)
            attn = layer.self_attn.attend(normed.view(batch, stop - begin, hidden), cos[begin:stop],
                                          sin[begin:stop], kv, index, start + begin)
            attended.append(_start(attn.reshape(-1, attn.shape[-1]), layer.self_attn.o_proj.weight,
                                   parallel, exchange))
        for wave in range(len(spans)):
            normed, residual[wave] = attended[wave].finish(
                0, residual=residual[wave], norm=layer.post_attention_layernorm,
                bias=layer.self_attn.o_proj.bias)
            downs[wave] = _start(layer.mlp.inner(normed), layer.mlp.down_proj.weight, parallel,
                                 exchange)
    out = [down.finish(0, residual=rows) for down, rows in zip(downs, residual)]
    return torch.cat([part.view(batch, -1, hidden) for part in out], dim=1)


def _start(rows: torch.Tensor, weight: torch.Tensor, parallel: ParallelContext,
           exchange) -> comm.PendingRows:
    """rows @ weight^T as one tile whose sum over ranks starts at once."""
    pending = comm.PendingRows(rows.shape[0], weight.shape[0], rows, parallel, [(0, rows.shape[0])],
                               exchange, front_end_wait=True)
    pending.compute(0, rows, weight)
    return pending
