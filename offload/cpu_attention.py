"""Decode attention on the host CPU, over a KV cache that lives in host memory.

One or a few queries against [Tk, D] keys per head is a matrix-vector product: the work is
reading the cache once, so speed is host memory bandwidth.

A cache in a float dtype goes to PyTorch's CPU flash-attention kernel
(`aten._scaled_dot_product_flash_attention_for_cpu`), which reads bf16/fp16 rows in place
through their strides (no conversion pass), shares K/V across a GQA group, spreads heads over
PyTorch's intra-op threads and returns the log-sum-exp the GPU merge needs. Its causal flag is
aligned top-left, so several queries get an explicit bottom-right mask.

An fp8 cache (and any case the flash kernel cannot express) takes the tiled path: keys in
tiles of 8192 rows, converted to float32 per tile (never the whole cache: 128 MiB of
temporaries per tile at 32 KV heads and D = 128), with an online softmax across tiles
(FlashAttention-2's recurrence). Tiles are large because each tile costs about a dozen
PyTorch calls, each with a fixed cost. The float32 tiles are converted into buffers kept in a
`TileWorkspace` across calls: a fresh 128 MiB buffer per tile spends more time faulting its
pages in than converting (measured on a 2-core host: 32 ms per 8192-key tile into new memory,
9 ms into a reused buffer). PyTorch's intra-op threads (`torch.set_num_threads`, set once by
the caller) split each tile's matmuls across cores.
"""

import math

import torch

from facli.offload.fp8 import FP8

KEY_TILE = 8192


class TileWorkspace:
    """Reusable float32 buffers for converted K and V tiles (grown on demand, never shrunk)."""

    def __init__(self):
        self._buffers: dict[str, torch.Tensor] = {}

    def buffer(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        need = math.prod(shape)
        held = self._buffers.get(name)
        if held is None or held.numel() < need:
            held = self._buffers[name] = torch.empty(need, dtype=torch.float32)
        return held[:need].view(shape)


def _tile_float(x, scales, start, stop, out: torch.Tensor):
    """x[:, start:stop] as float32 [B, Hkv, n, D] in `out`, dequantized with scales [B, Tk, Hkv]
    if fp8."""
    out.copy_(x[:, start:stop])
    if x.dtype == FP8:
        out.mul_(scales[:, start:stop].unsqueeze(-1))
    return out.transpose(1, 2)


def cpu_decode_attention(q, k, v, length, *, scale=None, k_scales=None, v_scales=None,
                         key_tile=KEY_TILE, workspace: TileWorkspace | None = None):
    """Attention of the newest Tq tokens over the first `length` cached positions, causal.

    q [B, Tq, Hq, D]; k, v [B, Tk, Hkv, D] (Tk >= length) in any float dtype, or float8_e4m3fn
    with k_scales, v_scales [B, Tk, Hkv]. Query i sits at position length - Tq + i (it may lie
    before the first key when the cache holds only a suffix: see `first_position`).
    Returns out [B, Tq, Hq, D] float32 and lse [B, Hq, Tq] float32 (-inf where no key is seen).
    """
    return cpu_suffix_attention(q, k, v, length, first_position=0, scale=scale,
                                k_scales=k_scales, v_scales=v_scales, key_tile=key_tile,
                                workspace=workspace)


def cpu_suffix_attention(q, k, v, length, *, first_position, scale=None, k_scales=None,
                         v_scales=None, key_tile=KEY_TILE, workspace: TileWorkspace | None = None):
    """Like `cpu_decode_attention`, for a cache whose row 0 holds absolute position
    `first_position`; `length` counts absolute positions (queries end at length - 1).
    workspace: buffers to reuse across calls of the tiled path (a new one per call when None)."""
    if k.dtype != FP8 and length - q.shape[1] >= first_position:
        return _flash_attention(q, k, v, length - first_position, scale)
    return _tiled_attention(q, k, v, length, first_position, scale, k_scales, v_scales,
                            key_tile, workspace)


def _flash_attention(q, k, v, rows, scale):
    """Every query sees at least the first row (the caller checked): no fully masked row, which
    the flash kernel would turn into NaN."""
    q_len = q.shape[1]
    keys, values = k[:, :rows].transpose(1, 2), v[:, :rows].transpose(1, 2)
    mask = None
    if q_len > 1:  # query i sits at row rows - q_len + i and sees rows up to it; additive
        hidden = torch.arange(rows).view(1, -1) > torch.arange(rows - q_len, rows).view(-1, 1)
        mask = torch.zeros(hidden.shape, dtype=k.dtype).masked_fill(hidden, float("-inf"))
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q.to(k.dtype).transpose(1, 2), keys, values, 0.0, False, attn_mask=mask, scale=scale)
    return out.transpose(1, 2).float(), lse.float()


def _tiled_attention(q, k, v, length, first_position, scale, k_scales, v_scales, key_tile,
                     workspace):
    batch, q_len, q_heads, head_dim = q.shape
    kv_heads = k.shape[2]
    group = q_heads // kv_heads
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    rows = length - first_position
    # [B, Hkv, group * Tq, D]: the group's query heads share each K/V tile (no repeat).
    qh = (q.float() * scale).reshape(batch, q_len, kv_heads, group, head_dim)
    qh = qh.permute(0, 2, 3, 1, 4).reshape(batch, kv_heads, group * q_len, head_dim)
    query_pos = torch.arange(length - q_len, length).repeat(group)
    m = torch.full((batch, kv_heads, group * q_len, 1), float("-inf"))
    denom = torch.zeros_like(m)
    acc = torch.zeros(batch, kv_heads, group * q_len, head_dim)
    workspace = workspace or TileWorkspace()
    for start in range(0, max(rows, 0), key_tile):
        stop = min(start + key_tile, rows)
        shape = (batch, stop - start, kv_heads, head_dim)
        k_tile = _tile_float(k, k_scales, start, stop, workspace.buffer("k", shape))
        scores = torch.matmul(qh, k_tile.transpose(-1, -2))
        if q_len > 1:
            key_pos = torch.arange(start, stop) + first_position
            hidden = key_pos.view(1, -1) > query_pos.view(-1, 1)
            scores = scores.masked_fill(hidden, float("-inf"))
        m_new = torch.maximum(m, scores.amax(dim=-1, keepdim=True))
        safe = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))
        probs = torch.exp(scores - safe)
        correction = torch.exp(m - safe)
        denom = denom * correction + probs.sum(dim=-1, keepdim=True)
        v_tile = _tile_float(v, v_scales, start, stop, workspace.buffer("v", shape))
        acc = acc * correction + torch.matmul(probs, v_tile)
        m = m_new
    seen = denom > 0  # false only for a query that sees no key
    out = torch.where(seen, acc / denom.clamp_min(1e-30), torch.zeros_like(acc))
    lse = torch.where(seen, m + torch.log(denom.clamp_min(1e-30)), float("-inf"))
    out = out.reshape(batch, kv_heads, group, q_len, head_dim).permute(0, 3, 1, 2, 4)
    lse = lse.reshape(batch, kv_heads * group, q_len)
    return out.reshape(batch, q_len, q_heads, head_dim), lse
