"""Prefill attention in Triton: FlashAttention-2 forward with FastAttention's two-level tiling
and tiling-mask.

A program owns one outer block of BLOCK_M queries of one head and streams the K/V of that head's
KV group through BLOCK_N-key tiles (software-pipelined by Triton, `num_stages` deep). The causal
mask is never materialized: key tiles wholly visible to the block run an unmasked loop, the few
tiles that straddle the diagonal (or the ragged end of the keys) run a masked loop that builds a
[BLOCK_M, BLOCK_N] mask in registers, and tiles wholly above the diagonal are never visited. The
only memory beyond the output is the optional log-sum-exp, [B, Hq, Tq] floats: O(T).

fp8 (e4m3) K/V with one float32 scale per token and KV head (an fp8 KV cache) are read as they
are stored: each tile is converted exactly to q's dtype in registers (`e4m3.from_e4m3`), and the
scales multiply the scores by key column after Q @ K^T and the probabilities by key column before
P @ V, not every element of the tile. So attention over an fp8 prefix reads 1 byte per K/V value
plus 8 per key and head, with no dequantized copy in memory.

This kernel serves every GPU and the CPU lane; on Hopper, `facli.kernels.prefill_attention`
takes the warp-specialized Gluon kernel of `prefill_hopper` instead where it accepts the inputs
(16-bit K/V only).
"""

import math

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from facli.kernels import common
from facli.kernels.configs import PrefillConfig, prefill_config
from facli.kernels.e4m3 import from_e4m3

LOG2E = 1.4426950408889634


@triton.jit
def _load_tile(base, desc, b, col, start_n, stride_t, k_len, head_dim, offs_n, offs_d,
               MASKED: tl.constexpr, EVEN_D: tl.constexpr, TMA: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows start_n..start_n+BLOCK_N of one K or V head as [BLOCK_N, BLOCK_D]."""
    if TMA:
        # The copy engine zero-fills rows past k_len; the masked loop still masks scores.
        return desc.load([b, start_n, col]).reshape(BLOCK_N, BLOCK_D)
    # The tile's base in int64: at 256K keys, key * stride exceeds 2**31 for wide KV heads.
    ptrs = base + tl.cast(start_n, tl.int64) * stride_t + offs_n[:, None] * stride_t + offs_d[None, :]
    if MASKED:
        return tl.load(ptrs, mask=((start_n + offs_n)[:, None] < k_len) & (offs_d[None, :] < head_dim),
                       other=0.0)
    if EVEN_D:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=offs_d[None, :] < head_dim, other=0.0)


@triton.jit
def _load_scales(base, start_n, stride_st, k_len, offs_n, MASKED: tl.constexpr):
    """The [BLOCK_N] scales of keys start_n..start_n+BLOCK_N of one KV head (fp8 K/V)."""
    ptrs = base + (start_n + offs_n).to(tl.int64) * stride_st
    if MASKED:
        return tl.load(ptrs, mask=start_n + offs_n < k_len, other=0.0)
    return tl.load(ptrs)


@triton.jit
def _softmax_step(acc, l_i, m_i, qk, v, vs, start_n, q_pos, k_len, qk_scale, offs_n,
                  MASKED: tl.constexpr, CAUSAL: tl.constexpr, SCALED: tl.constexpr):
    """Fold one tile's raw scores qk [BLOCK_M, BLOCK_N] and values v into the running state
    (SCALED: v holds e4m3 values and vs [BLOCK_N] their scales)."""
    if MASKED:
        keys = start_n + offs_n
        visible = keys[None, :] < k_len
        if CAUSAL:
            visible = visible & (keys[None, :] <= q_pos[:, None])
        qk = tl.where(visible, qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        # A row that has seen no key yet keeps m = -inf; shift it by 0 instead (exp2 -> 0).
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_shift[:, None])
    else:
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        m_shift = m_new
        p = tl.math.exp2(qk * qk_scale - m_shift[:, None])  # one FMA per score
    alpha = tl.math.exp2(m_i - m_shift)
    l_i = l_i * alpha + tl.sum(p, 1)
    if SCALED:
        p = p * vs[None, :]  # P @ (vs * V8) = (P * vs) @ V8: one scale per key column
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return acc, l_i, m_new


@triton.jit
def _tiles(acc, l_i, m_i, q, k_base, v_base, desc_k, desc_v, ks_base, vs_base, b, col, stride_kt,
           stride_vt, stride_st, q_pos, lo, hi, k_len, qk_scale, head_dim, MASKED: tl.constexpr,
           CAUSAL: tl.constexpr, EVEN_D: tl.constexpr, TMA: tl.constexpr, WS: tl.constexpr,
           SCALED: tl.constexpr, ASM: tl.constexpr, BLOCK_N: tl.constexpr,
           BLOCK_D: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    for start_n in tl.range(lo, hi, BLOCK_N, warp_specialize=WS):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        k = _load_tile(k_base, desc_k, b, col, start_n, stride_kt, k_len, head_dim, offs_n, offs_d,
                       MASKED, EVEN_D, TMA, BLOCK_N, BLOCK_D)
        if SCALED:
            k = from_e4m3(k, q.dtype, ASM)
        qk = tl.dot(q, tl.trans(k))
        v = _load_tile(v_base, desc_v, b, col, start_n, stride_vt, k_len, head_dim, offs_n, offs_d,
                       MASKED, EVEN_D, TMA, BLOCK_N, BLOCK_D)
        if SCALED:
            # e4m3 values convert exactly; Q @ (ks * K8)^T = (Q @ K8^T) * ks by key column.
            qk = qk * _load_scales(ks_base, start_n, stride_st, k_len, offs_n, MASKED)[None, :]
            v = from_e4m3(v, q.dtype, ASM)
            vs = _load_scales(vs_base, start_n, stride_st, k_len, offs_n, MASKED)
        else:
            vs = 1.0
        acc, l_i, m_i = _softmax_step(acc, l_i, m_i, qk, v, vs, start_n, q_pos, k_len, qk_scale,
                                      offs_n, MASKED, CAUSAL, SCALED)
    return acc, l_i, m_i


@triton.jit
def _prefill_kernel(Q, K, V, desc_k, desc_v, KS, VS, O, LSE,
                    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
                    stride_vb, stride_vt, stride_vh, stride_sb, stride_st, stride_sh,
                    stride_ob, stride_ot, stride_oh,
                    q_len, k_len, q_offset, q_heads, group, qk_scale, head_dim,
                    CAUSAL: tl.constexpr, WRITE_LSE: tl.constexpr, EVEN_D: tl.constexpr,
                    TMA: tl.constexpr, WS: tl.constexpr, SCALED: tl.constexpr, ASM: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # Heaviest causal blocks (the last queries) launch first, so the short ones fill the tail.
    start_m = tl.num_programs(0) - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    b32 = bh // q_heads
    b = b32.to(tl.int64)
    h = bh % q_heads
    col = (h // group) * head_dim  # the KV head's first column in a [B, Tk, Hkv * D] view
    kv_h = (h // group).to(tl.int64)
    h = h.to(tl.int64)

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m[:, None] < q_len
    d_ok = offs_d[None, :] < head_dim
    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None].to(tl.int64) * stride_qt + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok & d_ok, other=0.0)
    k_base = K + b * stride_kb + kv_h * stride_kh
    v_base = V + b * stride_vb + kv_h * stride_vh
    ks_base = KS + b * stride_sb + kv_h * stride_sh  # read only when SCALED
    vs_base = VS + b * stride_sb + kv_h * stride_sh

    first = q_offset + start_m * BLOCK_M  # absolute position of the block's first query
    if CAUSAL:
        hi = tl.minimum(k_len, first + BLOCK_M)
        full = tl.minimum((first + 1) // BLOCK_N * BLOCK_N, k_len // BLOCK_N * BLOCK_N)
    else:
        hi = k_len
        full = k_len // BLOCK_N * BLOCK_N
    q_pos = q_offset + offs_m

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    acc, l_i, m_i = _tiles(acc, l_i, m_i, q, k_base, v_base, desc_k, desc_v, ks_base, vs_base,
                           b32, col, stride_kt, stride_vt, stride_st, q_pos, 0, full, k_len,
                           qk_scale, head_dim, False, CAUSAL, EVEN_D, TMA, WS, SCALED, ASM,
                           BLOCK_N, BLOCK_D)
    acc, l_i, m_i = _tiles(acc, l_i, m_i, q, k_base, v_base, desc_k, desc_v, ks_base, vs_base,
                           b32, col, stride_kt, stride_vt, stride_st, q_pos, full, hi, k_len,
                           qk_scale, head_dim, True, CAUSAL, EVEN_D, TMA, False, SCALED, ASM,
                           BLOCK_N, BLOCK_D)

    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None].to(tl.int64) * stride_ot + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok & d_ok)
    if WRITE_LSE:
        lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453,
                       float("-inf"))
        tl.store(LSE + (b * q_heads + h) * q_len + offs_m, lse, mask=offs_m < q_len)


def _tma_ok(k, v, even_d) -> bool:
    """The Hopper copy engine needs sm90+, 16-byte aligned bases and strides, and [T, H*D] rows."""
    if not (even_d and k.is_cuda and torch.cuda.get_device_capability(k.device)[0] >= 9):
        return False
    return all(t.stride(2) == t.shape[3] and t.data_ptr() % 16 == 0
               and all(s * t.element_size() % 16 == 0 for s in t.stride()[:2]) for t in (k, v))


def _kv_descriptor(t, block_n):
    batch, k_len, heads, d = t.shape
    return TensorDescriptor(t, shape=[batch, k_len, heads * d], strides=[t.stride(0), t.stride(1), 1],
                            block_shape=[1, block_n, d])


def prefill_attention_triton(q, k, v, *, causal=True, q_offset=0, scale=None, return_lse=False,
                             config: PrefillConfig | None = None, k_scales=None, v_scales=None):
    """Triton prefill attention; arguments as `facli.kernels.prefill_attention`.

    k_scales, v_scales: float32 [B, Tk, Hkv] (any strides, the same for both) for float8_e4m3fn
    k and v (value = stored * scale), read by the kernel itself: K/V are never dequantized in
    memory. The GPU must convert e4m3 (compute capability 8.9 on).
    config overrides the block-size table. Returns out [B, Tq, Hq, D], or (out, lse [B, Hq, Tq]
    float32, natural log) when return_lse.
    """
    scaled = common.check_fp8_scales(k, v, k_scales, v_scales)
    common.check_attention_inputs(q, k, v, fp8_cache=scaled)
    if common.interpreted() and q.dtype == torch.bfloat16:
        # The interpreter's bf16 arithmetic is wrong; compute in float32 there.
        cast = (lambda t: t) if scaled else (lambda t: t.float())
        res = prefill_attention_triton(q.float(), cast(k), cast(v), causal=causal,
                                       q_offset=q_offset, scale=scale, return_lse=return_lse,
                                       config=config, k_scales=k_scales, v_scales=v_scales)
        return (res[0].to(q.dtype), res[1]) if return_lse else res.to(q.dtype)
    common.check_q_offset(q_offset)
    if q.stride(-1) != 1:
        q = q.contiguous()
    batch, q_len, q_heads, head_dim = q.shape
    k_len, kv_heads = k.shape[1], k.shape[2]
    out = common.empty(batch, q_len, q_heads, head_dim, dtype=q.dtype, device=q.device)
    lse = common.empty(batch, q_heads, q_len, dtype=torch.float32, device=q.device) if return_lse else out
    if q_len == 0:
        return (out, lse) if return_lse else out
    cfg = config or prefill_config(q.device, head_dim, q_len, causal=causal, dtype=q.dtype)
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    block_d = max(16, triton.next_power_of_2(head_dim))
    asm = scaled and not common.interpreted()  # the kernel converts the bytes itself
    if asm:
        k, v = k.view(torch.uint8), v.view(torch.uint8)
    tma = cfg.tma and _tma_ok(k, v, head_dim == block_d)
    desc_k, desc_v = (_kv_descriptor(k, cfg.block_n), _kv_descriptor(v, cfg.block_n)) if tma else (k, v)
    k_s, v_s = (k_scales, v_scales) if scaled else (out, out)
    scale_strides = k_scales.stride() if scaled else (0, 0, 0)
    grid = (triton.cdiv(q_len, cfg.block_m), batch * q_heads)
    _prefill_kernel[grid](
        q, k, v, desc_k, desc_v, k_s, v_s, out, lse,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), *scale_strides,
        out.stride(0), out.stride(1), out.stride(2),
        q_len, k_len, q_offset, q_heads, q_heads // kv_heads, scale * LOG2E, head_dim,
        CAUSAL=causal, WRITE_LSE=return_lse, EVEN_D=head_dim == block_d, TMA=tma,
        WS=tma and cfg.warp_specialize, SCALED=scaled, ASM=asm,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=block_d,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return (out, lse) if return_lse else out
