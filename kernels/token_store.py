"""A decode step's work between the q/k/v projection and attention, in one launch: q and k
rotated, and k and v stored in the layer's cache at each sequence's position, as they are
(bf16/fp16) or quantized to e4m3 with a float32 scale per head vector. Separately it is four to
six small kernels per layer; `facli.kernels.elementwise.rotate_and_store_token` documents it
and holds the PyTorch reference.
"""

import triton
import triton.language as tl

from facli.kernels import common
from facli.kernels.elementwise_triton import rotate_halves
from facli.kernels.fp8_kv import e4m3_scale, to_e4m3


@triton.jit
def _load_halves(row, offs, ok, HALF: tl.constexpr):
    x1 = tl.load(row + offs, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(row + HALF + offs, mask=ok, other=0.0).to(tl.float32)
    return x1, x2


@triton.jit
def _store_halves(row, scale_at, x1, x2, offs, ok, HALF: tl.constexpr, FP8: tl.constexpr):
    """One head vector, given as its float32 halves, into a cache row (quantized with FP8)."""
    dtype = row.dtype.element_ty
    if FP8:
        scale = e4m3_scale(tl.maximum(tl.max(tl.abs(x1), 0), tl.max(tl.abs(x2), 0)))
        tl.store(row + offs, to_e4m3(x1, scale, dtype), mask=ok)
        tl.store(row + HALF + offs, to_e4m3(x2, scale, dtype), mask=ok)
        tl.store(scale_at, scale)
    else:
        tl.store(row + offs, x1.to(dtype), mask=ok)
        tl.store(row + HALF + offs, x2.to(dtype), mask=ok)


@triton.jit
def _rotate_and_store_kernel(Q, K, V, COS, SIN, QO, KC, VC, KS, VS, POS, stride_pos,
                             stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh,
                             stride_ob, stride_oh, stride_cb, stride_ct, stride_ch,
                             stride_sb, stride_st, stride_sh, stride_cos, q_heads,
                             HALF: tl.constexpr, BLOCK: tl.constexpr, FP8: tl.constexpr):
    """Program (b, head): query head `head` of sequence b, or KV head head - q_heads."""
    b = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    offs = tl.arange(0, BLOCK)
    ok = offs < HALF
    c1, c2 = _load_halves(COS + b * stride_cos, offs, ok, HALF)
    s1, s2 = _load_halves(SIN + b * stride_cos, offs, ok, HALF)
    dtype = QO.dtype.element_ty
    if head < q_heads:
        x1, x2 = _load_halves(Q + b * stride_qb + head * stride_qh, offs, ok, HALF)
        y1, y2 = rotate_halves(x1, x2, c1, c2, s1, s2, dtype)
        out = QO + b * stride_ob + head * stride_oh
        tl.store(out + offs, y1, mask=ok)
        tl.store(out + HALF + offs, y2, mask=ok)
    else:
        h = (head - q_heads).to(tl.int64)
        pos = tl.load(POS + b * stride_pos).to(tl.int64)
        cache_at = b * stride_cb + pos * stride_ct + h * stride_ch
        scale_at = b * stride_sb + pos * stride_st + h * stride_sh
        x1, x2 = _load_halves(K + b * stride_kb + h * stride_kh, offs, ok, HALF)
        y1, y2 = rotate_halves(x1, x2, c1, c2, s1, s2, dtype)
        _store_halves(KC + cache_at, KS + scale_at, y1.to(tl.float32), y2.to(tl.float32), offs,
                      ok, HALF, FP8)
        v1, v2 = _load_halves(V + b * stride_vb + h * stride_vh, offs, ok, HALF)
        _store_halves(VC + cache_at, VS + scale_at, v1, v2, offs, ok, HALF, FP8)


def rotate_and_store_token_triton(q, k, v, cos, sin, k_cache, v_cache, position,
                                  k_scales=None, v_scales=None):
    batch, steps, q_heads, head_dim = q.shape
    kv_heads = k.shape[2]
    if steps != 1 or k.shape != v.shape or k.shape[:2] != (batch, 1) or head_dim % 2:
        raise ValueError(f"expected q [B, 1, Hq, D] and k, v [B, 1, Hkv, D] with an even D, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)} and {tuple(v.shape)}")
    if k_cache.stride() != v_cache.stride() or k_cache.shape[2:] != k.shape[2:]:
        raise ValueError(f"expected K and V caches [B, T, {kv_heads}, {head_dim}] with the same "
                         f"strides, got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if min(t.stride(-1) for t in (q, k, v, k_cache)) != 1 or cos.stride(-1) != 1 or sin.stride() != cos.stride():
        raise ValueError("expected a unit stride in the head dim, and cos and sin alike")
    if position.numel() not in (1, batch) or position.device != k_cache.device:
        raise ValueError(f"expected 1 or {batch} positions on {k_cache.device}, got "
                         f"{position.numel()} on {position.device}")
    fp8 = k_scales is not None
    if fp8 and (v_scales is None or k_scales.stride() != v_scales.stride()):
        raise ValueError("expected both K and V scales, with the same strides")
    # cos, sin: [1, D] or [T=1, D] for every sequence, or [B, 1, D] one row per sequence.
    scales = k_scales if fp8 else k_cache
    out = common.empty(*q.shape, dtype=q.dtype, device=q.device)
    _rotate_and_store_kernel[(batch, q_heads + kv_heads)](
        q, k, v, cos, sin, out, k_cache, v_cache, scales, v_scales if fp8 else v_cache, position,
        position.stride(0) if position.numel() > 1 else 0,
        q.stride(0), q.stride(2), k.stride(0), k.stride(2), v.stride(0), v.stride(2),
        out.stride(0), out.stride(2), *k_cache.stride()[:3],
        *(k_scales.stride() if fp8 else (0, 0, 0)), cos.stride(0) if cos.dim() == 3 else 0,
        q_heads, HALF=head_dim // 2, BLOCK=triton.next_power_of_2(head_dim // 2), FP8=fp8,
        num_warps=1, enable_fp_fusion=False)
    return out
