"""Decode attention in Triton: split-KV (flash-decoding) with FlashDecoding++'s asynchronous
softmax.

Stage 1: program (split, b, kv head) reads its slice of the cache once for all the query heads
of that KV group (GQA rows packed into one small matrix: Hq/Hkv heads x Tq queries, padded to
16 rows, the "flat GEMM" shape) and writes a partial output and log-sum-exp per row.
Stage 2: one program per (b, head, query) merges the splits by log-sum-exp.

Asynchronous softmax. Softmax is invariant to any shift phi, so a split may sum exp(s - phi) * v
and exp(s - phi) against a unified phi, with no running max and no rescaling of the
accumulator per tile, and splits need not agree on anything but phi. The unified value is the
score of the row's query against cache position 0 (the attention-sink token that LLMs attend to
most; it is always visible and every split computes the same value from the same data, so no
synchronization or calibration is needed), or a per-head value given by the caller, e.g. from
score statistics of the layer. Each split also tracks its true max m; the shortcut is safe while
m - phi lies in [-WINDOW, WINDOW] (log2 units): above, exp2 could overflow float32 sums of up to
2**18 keys times |v| < 2**16; below, the split's largest term would underflow. A split with any
row outside the window redoes its keys with the exact online-softmax (rescaling) path, so the
result is always exact to rounding; the fallback is counted per split.

The probabilities feed the P @ V product in the cache's dtype. bfloat16 has float32's exponent
range, so the window holds; float16 holds only 2**-24..2**16, too narrow for a shift chosen ahead,
so float16 caches always take the exact path (and count no fallback).

fp8 (e4m3) caches. Each K and V tile is read as bytes, converted exactly to q's dtype in
registers (inline PTX, four values per instruction group) and multiplied by its per-token scale
in the scores (K) and the probabilities (V). Their asynchronous path streams keys as the MMA's M
dimension (scores held keys x rows), so the row max and sum are kept per element and reduced once
after the loop instead of once per tile: that loop is bound by instruction latency, not by bytes.
"""

import math

import torch
import triton
import triton.language as tl

from facli.kernels import common
from facli.kernels.configs import DecodeConfig, decode_config, num_sms, row_splits
from facli.kernels.e4m3 import from_e4m3

LOG2E = 1.4426950408889634
WINDOW = 64.0
MAX_SPLITS = 128

@triton.jit
def _tile(k_base, v_base, n, stride_kt, stride_vt, stop, offs_n, offs_d, d_ok, q,
          ks_base, vs_base, stride_st, SCALED: tl.constexpr, ASM: tl.constexpr,
          BLOCK_N: tl.constexpr):
    """Keys n..n+BLOCK_N: positions, K and V in q's dtype, and K/V scales (fp8 caches; else 1)."""
    n = tl.multiple_of(n, BLOCK_N)
    keys = n + offs_n
    kv_ok = (keys[:, None] < stop) & d_ok
    # The tile's base in int64: at 256K positions, position * stride exceeds 2**31.
    k = tl.load(k_base + n.to(tl.int64) * stride_kt + offs_n[:, None] * stride_kt + offs_d[None, :],
                mask=kv_ok, other=0.0)
    v = tl.load(v_base + n.to(tl.int64) * stride_vt + offs_n[:, None] * stride_vt + offs_d[None, :],
                mask=kv_ok, other=0.0)
    # One return statement: the compiler types every return of a function alike, even under a
    # constexpr branch.
    if SCALED:
        # e4m3 values convert exactly; their per-token scale multiplies the scores (K) and the
        # probabilities (V) instead of every element of the tile.
        key_ok = keys < stop
        ks = tl.load(ks_base + keys.to(tl.int64) * stride_st, mask=key_ok, other=0.0)
        vs = tl.load(vs_base + keys.to(tl.int64) * stride_st, mask=key_ok, other=0.0)
        k, v = from_e4m3(k, q.dtype, ASM), from_e4m3(v, q.dtype, ASM)
    else:
        ks, vs = 1.0, 1.0
    return keys, k, v, ks, vs


@triton.jit
def _scores(q, k, keys, stop, q_pos, qk_scale, ks, SCALED: tl.constexpr):
    qk = tl.dot(q, tl.trans(k)) * qk_scale
    if SCALED:
        qk = qk * ks[None, :]
    visible = (keys[None, :] < stop) & (keys[None, :] <= q_pos[:, None])
    return tl.where(visible, qk, float("-inf"))


@triton.jit
def _weighted(p, vs, SCALED: tl.constexpr):
    if SCALED:
        p = p * vs[None, :]
    return p


@triton.jit
def _split(q, k_base, v_base, stride_kt, stride_vt, start, stop, q_pos, phi, qk_scale, head_dim,
           ks_base, vs_base, stride_st, EXACT: tl.constexpr, SCALED: tl.constexpr,
           ASM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
           BLOCK_D: tl.constexpr):
    """One split's partial (acc, l_i, m). EXACT: online softmax, rescaled against the split's own
    running max m. Otherwise sums against the unified phi, with no running max to rescale by (m
    is tracked only to validate phi)."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d[None, :] < head_dim
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    for n in range(start, stop, BLOCK_N):
        keys, k, v, ks, vs = _tile(k_base, v_base, n, stride_kt, stride_vt, stop, offs_n, offs_d,
                                   d_ok, q, ks_base, vs_base, stride_st, SCALED, ASM, BLOCK_N)
        qk = _scores(q, k, keys, stop, q_pos, qk_scale, ks, SCALED)
        if EXACT:
            m_new = tl.maximum(m, tl.max(qk, 1))
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(qk - shift[:, None])
            alpha = tl.math.exp2(m - shift)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = tl.dot(_weighted(p, vs, SCALED).to(v.dtype), v, acc * alpha[:, None])
            m = m_new
        else:
            m = tl.maximum(m, tl.max(qk, 1))
            p = tl.math.exp2(qk - phi[:, None])
            l_i += tl.sum(p, 1)
            acc = tl.dot(_weighted(p, vs, SCALED).to(v.dtype), v, acc)
    return acc, l_i, m


@triton.jit
def _split_keys_major(q, k_base, v_base, stride_kt, stride_vt, start, stop, q_pos, phi, qk_scale,
                      head_dim, ks_base, vs_base, stride_st, ASM: tl.constexpr,
                      BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """_split's asynchronous path for an fp8 cache, with the scores held keys x rows (K is the
    first MMA operand): the max and sum stay per element until the loop ends."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d[None, :] < head_dim
    q_t = tl.trans(q)
    m = tl.full([BLOCK_N, BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_N, BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    for n in range(start, stop, BLOCK_N):
        keys, k, v, ks, vs = _tile(k_base, v_base, n, stride_kt, stride_vt, stop, offs_n, offs_d,
                                   d_ok, q, ks_base, vs_base, stride_st, True, ASM, BLOCK_N)
        s_t = tl.dot(k, q_t) * (ks * qk_scale)[:, None]
        visible = (keys[:, None] < stop) & (keys[:, None] <= q_pos[None, :])
        s_t = tl.where(visible, s_t, float("-inf"))
        m = tl.maximum(m, s_t)
        p_t = tl.math.exp2(s_t - phi[None, :])
        l_i += p_t
        acc = tl.dot(tl.trans((p_t * vs[:, None]).to(v.dtype)), v, acc)
    return acc, tl.sum(l_i, 0), tl.max(m, 0)


@triton.jit
def _split_kernel(Q, K, V, KS, VS, LENS, PHI, O_PART, LSE_PART, FALLBACK,
                  stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
                  stride_vb, stride_vt, stride_vh, stride_sb, stride_st, stride_sh,
                  kv_heads, q_len, group, qk_scale, head_dim,
                  GIVEN_PHI: tl.constexpr, ASYNC: tl.constexpr, SCALED: tl.constexpr,
                  ASM: tl.constexpr, WINDOW: tl.constexpr,
                  BLOCK_R: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    split = tl.program_id(0)
    num_splits = tl.num_programs(0)
    bh = tl.program_id(1)
    b = (bh // kv_heads).to(tl.int64)
    kv_h = (bh % kv_heads).to(tl.int64)
    seq_len = tl.load(LENS + b).to(tl.int32)

    rows = tl.arange(0, BLOCK_R)  # row r: head kv_h * group + r // q_len, query r % q_len
    t = rows % q_len
    h = kv_h * group + rows // q_len
    row_ok = rows < group * q_len
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d[None, :] < head_dim
    q = tl.load(Q + b * stride_qb + t[:, None] * stride_qt + h[:, None] * stride_qh + offs_d[None, :],
                mask=row_ok[:, None] & d_ok, other=0.0)
    q_pos = seq_len - q_len + t
    k_base = K + b * stride_kb + kv_h * stride_kh
    v_base = V + b * stride_vb + kv_h * stride_vh
    ks_base = KS + b * stride_sb + kv_h * stride_sh
    vs_base = VS + b * stride_sb + kv_h * stride_sh

    if GIVEN_PHI:
        phi = tl.load(PHI + h, mask=row_ok, other=0.0) * 1.4426950408889634
    else:
        k0 = tl.load(k_base + offs_d, mask=offs_d < head_dim, other=0.0)
        if SCALED:
            k0 = from_e4m3(k0, q.dtype, ASM).to(tl.float32) * tl.load(ks_base)
        else:
            k0 = k0.to(tl.float32)
        phi = tl.sum(q.to(tl.float32) * k0[None, :], 1) * qk_scale

    # Splits share the sequence's written keys, not the cache's capacity: a graph replays one
    # split count for every length, and a cache sized for 256K may hold 8K.
    chunk = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * chunk
    stop = tl.minimum(start + chunk, seq_len)
    if ASYNC:
        if SCALED:
            acc, l_i, m = _split_keys_major(q, k_base, v_base, stride_kt, stride_vt, start, stop,
                                            q_pos, phi, qk_scale, head_dim, ks_base, vs_base,
                                            stride_st, ASM, BLOCK_R, BLOCK_N, BLOCK_D)
        else:
            acc, l_i, m = _split(q, k_base, v_base, stride_kt, stride_vt, start, stop, q_pos, phi,
                                 qk_scale, head_dim, ks_base, vs_base, stride_st, False, False,
                                 False, BLOCK_R, BLOCK_N, BLOCK_D)
        gap = m - phi
        unsafe = (m > float("-inf")) & ((gap > WINDOW) | (gap < -WINDOW))
        fallback = tl.sum(unsafe.to(tl.int32), 0) > 0
        ref = phi
        if fallback:
            acc, l_i, ref = _split(q, k_base, v_base, stride_kt, stride_vt, start, stop, q_pos,
                                   phi, qk_scale, head_dim, ks_base, vs_base, stride_st, True,
                                   SCALED, ASM, BLOCK_R, BLOCK_N, BLOCK_D)
        tl.store(FALLBACK + bh * num_splits + split, fallback.to(tl.int32))
    else:
        acc, l_i, ref = _split(q, k_base, v_base, stride_kt, stride_vt, start, stop, q_pos, phi,
                               qk_scale, head_dim, ks_base, vs_base, stride_st, True, SCALED,
                               ASM, BLOCK_R, BLOCK_N, BLOCK_D)
        tl.store(FALLBACK + bh * num_splits + split, 0)

    seen = l_i > 0.0
    lse = tl.where(seen, ref + tl.math.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    part = ((b * (kv_heads * group) + h) * q_len + t) * num_splits + split
    tl.store(LSE_PART + part, lse, mask=row_ok)
    tl.store(O_PART + part[:, None] * head_dim + offs_d[None, :], out, mask=row_ok[:, None] & d_ok)


@triton.jit
def _merge_kernel(O_PART, LSE_PART, O, LSE, stride_ob, stride_ot, stride_oh,
                  q_heads, q_len, num_splits, head_dim,
                  WRITE_LSE: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # (b, head, query), row-major
    t = row % q_len
    h = (row // q_len) % q_heads
    b = row // (q_len * q_heads)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < num_splits
    lse = tl.load(LSE_PART + row * num_splits + offs_s, mask=s_ok, other=float("-inf"))
    part = tl.load(O_PART + (row * num_splits + offs_s[:, None]) * head_dim + offs_d[None, :],
                   mask=s_ok[:, None] & (offs_d[None, :] < head_dim), other=0.0)
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.math.exp2(lse - m)
    total = tl.sum(w, 0)
    out = tl.sum(w[:, None] * part, 0) / tl.where(total > 0.0, total, 1.0)
    tl.store(O + b * stride_ob + t * stride_ot + h * stride_oh + offs_d, out.to(O.dtype.element_ty),
             mask=offs_d < head_dim)
    if WRITE_LSE:
        tl.store(LSE + row, tl.where(total > 0.0, (m + tl.math.log2(total)) * 0.6931471805599453,
                                     float("-inf")))


def choose_num_splits(batch: int, kv_heads: int, cache_len: int, device, cfg: DecodeConfig) -> int:
    """Splits per (sequence, KV head), from shapes only (no look at cache_lens: graph-safe).

    One wave of programs: programs_per_sm per multiprocessor if each split then streams at least
    cfg.long_split_tiles tiles, else fewer per multiprocessor (down to one), never below 4 tiles per
    split. A part-filled second wave leaves SMs idle (up to 9% of a call on an H200,
    benchmarks/decode_sweep.py), and short splits pay their start-up and their share of the merge. Rows of a batch with more
    programs than half a wave, or whose even share leaves the wave part-filled, take the splits
    that fill their waves (configs.row_splits).
    """
    most = max(1, min(MAX_SPLITS, triton.cdiv(cache_len, 4 * cfg.block_n)))
    programs = batch * kv_heads
    rows = row_splits(cfg, programs, num_sms(device), most)
    if rows is not None:
        return rows

    def one_wave(per_sm):
        return max(1, min(most, per_sm * num_sms(device) // programs))

    for per_sm in range(cfg.programs_per_sm, 1, -1):
        if cache_len >= one_wave(per_sm) * cfg.long_split_tiles * cfg.block_n:
            return one_wave(per_sm)
    return one_wave(1)


def decode_attention_triton(q, k_cache, v_cache, cache_lens, *, scale=None, return_lse=False,
                            unified_max=None, config: DecodeConfig | None = None,
                            num_splits: int | None = None, fallback_out=None,
                            k_scales=None, v_scales=None):
    """Triton decode attention; arguments as `facli.kernels.decode_attention`.

    k_scales, v_scales: float32 [B, Tmax, Hkv] for float8_e4m3fn caches (value = stored * scale),
    read by the kernel itself: the cache is never dequantized in memory.

    unified_max: None (the sink-token score, see the module doc) or a float32 tensor [Hq] of
    per-head phi in score units (scale * q.k). config / num_splits override the tables.
    fallback_out: optional int32 tensor whose first B * Hkv * num_splits entries receive one flag
    per (b, kv head, split), set where the exact fallback ran (num_splits <= MAX_SPLITS).
    Returns out [B, Tq, Hq, D], or (out, lse [B, Hq, Tq] float32, natural log).
    """
    scaled = common.check_fp8_scales(k_cache, v_cache, k_scales, v_scales)
    common.check_attention_inputs(q, k_cache, v_cache, fp8_cache=scaled)
    if common.interpreted() and q.dtype == torch.bfloat16:
        cast = (lambda t: t) if scaled else (lambda t: t.float())
        res = decode_attention_triton(q.float(), cast(k_cache), cast(v_cache), cache_lens,
                                      scale=scale, return_lse=return_lse, unified_max=unified_max,
                                      config=config, num_splits=num_splits, fallback_out=fallback_out,
                                      k_scales=k_scales, v_scales=v_scales)
        return (res[0].to(q.dtype), res[1]) if return_lse else res.to(q.dtype)
    batch, q_len, q_heads, head_dim = q.shape
    cache_len, kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = q_heads // kv_heads
    if cache_lens.shape != (batch,) or cache_lens.device != q.device:
        raise ValueError(f"expected cache_lens [{batch}] on {q.device}, got {tuple(cache_lens.shape)}")
    if unified_max is not None and unified_max.shape != (q_heads,):
        raise ValueError(f"expected unified_max [{q_heads}], got {tuple(unified_max.shape)}")
    cfg = config or decode_config(q.device, head_dim, fp8=scaled)
    splits = num_splits or choose_num_splits(batch, kv_heads, cache_len, q.device, cfg)
    if not 1 <= splits <= MAX_SPLITS:
        raise ValueError(f"expected 1 <= num_splits <= {MAX_SPLITS}, got {splits}")
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    block_d = max(16, triton.next_power_of_2(head_dim))
    dev = q.device
    o_part = common.empty(batch, q_heads, q_len, splits, head_dim, dtype=torch.float32, device=dev)
    lse_part = common.empty(batch, q_heads, q_len, splits, dtype=torch.float32, device=dev)
    flags = fallback_out if fallback_out is not None else common.empty(
        batch * kv_heads * splits, dtype=torch.int32, device=dev)
    if flags.numel() < batch * kv_heads * splits:
        raise ValueError(f"expected fallback_out of {batch * kv_heads * splits} int32")
    phi = unified_max.float().contiguous() if unified_max is not None else lse_part
    k_s, v_s = (k_scales, v_scales) if scaled else (lse_part, lse_part)
    scale_strides = k_scales.stride() if scaled else (0, 0, 0)
    asm = scaled and not common.interpreted()  # the kernel converts the bytes itself
    if asm:
        k_cache, v_cache = k_cache.view(torch.uint8), v_cache.view(torch.uint8)
    _split_kernel[(splits, batch * kv_heads)](
        q, k_cache, v_cache, k_s, v_s, cache_lens, phi, o_part, lse_part, flags,
        q.stride(0), q.stride(1), q.stride(2), k_cache.stride(0), k_cache.stride(1),
        k_cache.stride(2), v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), *scale_strides,
        kv_heads, q_len, group, scale * LOG2E, head_dim,
        GIVEN_PHI=unified_max is not None, ASYNC=q.dtype != torch.float16, SCALED=scaled,
        ASM=asm, WINDOW=WINDOW,
        BLOCK_R=max(16, triton.next_power_of_2(group * q_len)), BLOCK_N=cfg.block_n,
        BLOCK_D=block_d, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    out = common.empty(batch, q_len, q_heads, head_dim, dtype=q.dtype, device=dev)
    lse = common.empty(batch, q_heads, q_len, dtype=torch.float32, device=dev) if return_lse else out
    _merge_kernel[(batch * q_heads * q_len,)](
        o_part, lse_part, out, lse, out.stride(0), out.stride(1), out.stride(2),
        q_heads, q_len, splits, head_dim,
        WRITE_LSE=return_lse, BLOCK_S=triton.next_power_of_2(splits), BLOCK_D=block_d,
        num_warps=4 if splits <= 32 else 8,
    )
    return (out, lse) if return_lse else out
