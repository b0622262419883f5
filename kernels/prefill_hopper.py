"""Prefill attention for Hopper (sm90) in Gluon, Triton's explicit-layout dialect.

The same two-level tiling and tiling-mask as `prefill.py`, with the work of a program split over
warp-specialized partitions:

- a producer warp streams this head's K and V tiles into a ring of shared-memory stages with the
  copy engine (TMA), and waits for both consumers to release a stage before refilling it;
- two consumer warpgroups each own 64 of the program's 128 queries: Q @ K^T on the tensor cores
  (wgmma, Q and K from shared memory), the online softmax in registers, P @ V with P straight
  from registers.

The consumers share the K/V stages but never a CTA-wide barrier, so one warpgroup's softmax
runs while the other's matrix products hold the tensor cores (the overlap FlashAttention-3
gets from warp specialization), which the single-program Triton kernel cannot express. Inside a
warpgroup, tile i's Q @ K^T is issued together with tile i-1's P @ V, so the softmax of tile i
also runs beside the warpgroup's own value product; K stages are released after Q @ K^T, V
stages after P @ V, so the producer refills each as early as it can.

Q, K and V are read as [B, T, H * D] by the copy engine, which fills rows past T with zeros: those
keys lie in the masked tiles and get -inf scores, those queries are never stored.

An fp8 KV cache (e4m3 plus a float32 scale per token and KV head) takes the four-warp producer of
`prefill_hopper_fp8`, which dequantizes e4m3 tiles (half the bytes) into the 16-bit stages the
consumers read, unchanged; the two extra e4m3 stages fit beside them in shared memory, and the
consumers give the producer some registers.
"""

import math
import warnings

import torch
import triton

TESTED_TRITON = ("3.6.",)

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    # Gluon is experimental and its API moves between Triton releases: the kernel runs only on
    # the releases it was compiled and checked with on a GPU; elsewhere the Triton kernel serves.
    GLUON = triton.__version__.startswith(TESTED_TRITON)
except ImportError:  # a Triton without Gluon's Hopper ops
    GLUON = False

from facli.kernels import common
from facli.planner import policy

LOG2E = 1.4426950408889634
ROWS = 64  # queries per consumer warpgroup (wgmma's M is 64 per warpgroup)
BLOCK_M = 2 * ROWS
BLOCK_N = 128
STAGES = 2
HEAD_DIMS = (64, 128)
NOT_CAUSAL_SHIFT = 1 << 30  # added to query positions: every key is then visible
# Registers per thread: 12 warps (two consumer warpgroups, the producer's padded to four) share
# 64K registers; the producer keeps the minimum and the consumers split the rest.
MAX_REGS = 168
PRODUCER_REGS = 24
CONSUMER_REGS = 240
# fp8: the producer dequantizes with four warps, so the consumers give up some registers.
FP8_PRODUCER_REGS = 40
FP8_CONSUMER_REGS = 232
FP8_STAGES = 2

if GLUON:
    from facli.kernels.prefill_hopper_fp8 import producer_fp8

    @gluon.jit
    def _producer(descs, bufs, bars, out, pos):
        q_desc, k_desc, v_desc = descs
        q_bufs, k_bufs, v_bufs = bufs
        q_ready, k_ready, v_ready, k_empty, v_empty = bars
        b, q_col, kv_col, m_start, q_len, k_len, first, n_tiles, qk_scale, causal_shift, lse_len = pos
        BN: gl.constexpr = k_desc.block_type.shape[1]
        STAGE_COUNT: gl.constexpr = k_bufs.type.shape[0]
        mbarrier.expect(q_ready, 2 * q_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [b, m_start, q_col], q_ready, q_bufs.index(0))
        tma.async_copy_global_to_shared(q_desc, [b, m_start + q_desc.block_type.shape[1], q_col],
                                        q_ready, q_bufs.index(1))
        for i in range(n_tiles):
            stage = i % STAGE_COUNT
            # A fresh mbarrier counts as having completed the phase before phase 0.
            empty_phase = ((i // STAGE_COUNT) & 1) ^ 1
            mbarrier.wait(k_empty.index(stage), empty_phase)
            mbarrier.expect(k_ready.index(stage), k_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(k_desc, [b, i * BN, kv_col], k_ready.index(stage),
                                            k_bufs.index(stage))
            mbarrier.wait(v_empty.index(stage), empty_phase)
            mbarrier.expect(v_ready.index(stage), v_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(v_desc, [b, i * BN, kv_col], v_ready.index(stage),
                                            v_bufs.index(stage))

    @gluon.jit
    def _softmax(l_i, m_i, s, start_n, q_limit, k_len, qk_scale, MASKED: gl.constexpr,
                 s_layout: gl.constexpr, o_layout: gl.constexpr):
        """Fold one tile's raw scores s [ROWS, BN] into the running max and sum. Returns the
        probabilities, the factor that moves the accumulator to the new max, the sum and the max."""
        if MASKED:
            keys = start_n + gl.arange(0, s.shape[1], layout=gl.SliceLayout(0, s_layout))
            visible = (keys[None, :] < k_len) & (keys[None, :] <= q_limit[:, None])
            s = gl.where(visible, s * qk_scale, float("-inf"))
            m_new = gl.maximum(m_i, gl.max(s, 1))
            # A row that has seen no key yet keeps m = -inf; shift it by 0 instead (exp2 -> 0).
            m_shift = gl.where(m_new == float("-inf"), 0.0, m_new)
            p = gl.exp2(s - m_shift[:, None])
        else:
            m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
            m_shift = m_new
            p = gl.exp2(s * qk_scale - m_shift[:, None])  # one FMA per score
        alpha = gl.exp2(m_i - m_shift)
        l_i = l_i * alpha + gl.sum(p, 1)
        return p, gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), l_i, m_new

    @gluon.jit
    def _scores(q_smem, k_bufs, k_ready, i, s_layout: gl.constexpr):
        """Starts Q @ K_i^T on the tensor cores (asynchronous: the caller waits)."""
        STAGE_COUNT: gl.constexpr = k_bufs.type.shape[0]
        BN: gl.constexpr = k_bufs.type.shape[2]
        HEAD_D: gl.constexpr = k_bufs.type.shape[3]
        R: gl.constexpr = q_smem.type.shape[0]
        stage = i % STAGE_COUNT
        mbarrier.wait(k_ready.index(stage), (i // STAGE_COUNT) & 1)
        s = gl.zeros([R, BN], gl.float32, s_layout)
        k_tile = k_bufs.index(stage).reshape([BN, HEAD_D])
        return warpgroup_mma(q_smem, k_tile.permute((1, 0)), s, use_acc=False, is_async=True)

    @gluon.jit
    def _add_values(acc, p, v_bufs, v_ready, i):
        """Starts acc += P_i @ V_i (asynchronous: the caller waits)."""
        STAGE_COUNT: gl.constexpr = v_bufs.type.shape[0]
        BN: gl.constexpr = v_bufs.type.shape[2]
        HEAD_D: gl.constexpr = v_bufs.type.shape[3]
        stage = i % STAGE_COUNT
        mbarrier.wait(v_ready.index(stage), (i // STAGE_COUNT) & 1)
        return warpgroup_mma(p, v_bufs.index(stage).reshape([BN, HEAD_D]), acc, is_async=True)

    @gluon.jit
    def _consume_tiles(acc, l_i, m_i, p_prev, q_smem, k_bufs, v_bufs, bars, lo, hi, q_limit, k_len,
                       qk_scale, MASKED: gl.constexpr, s_layout: gl.constexpr, o_layout: gl.constexpr):
        """Tiles lo..hi-1, each one's Q @ K^T issued together with the previous tile's P @ V, so
        the softmax of tile i runs while the tensor cores add tile i-1's values."""
        q_ready, k_ready, v_ready, k_empty, v_empty = bars
        STAGE_COUNT: gl.constexpr = k_bufs.type.shape[0]
        BN: gl.constexpr = k_bufs.type.shape[2]
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        for i in range(lo, hi):
            s = _scores(q_smem, k_bufs, k_ready, i, s_layout)
            acc = _add_values(acc, p_prev, v_bufs, v_ready, i - 1)
            s = warpgroup_mma_wait(num_outstanding=1, deps=(s, ))  # in order: Q @ K_i^T is done
            mbarrier.arrive(k_empty.index(i % STAGE_COUNT), count=1)
            p, alpha, l_i, m_i = _softmax(l_i, m_i, s, i * BN, q_limit, k_len, qk_scale, MASKED,
                                          s_layout, o_layout)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
            mbarrier.arrive(v_empty.index((i - 1) % STAGE_COUNT), count=1)
            acc = acc * alpha[:, None]
            p_prev = gl.convert_layout(p.to(q_smem.dtype), p_layout)
        return acc, l_i, m_i, p_prev

    @gluon.jit
    def _consumer(descs, bufs, bars, out, pos, HALF: gl.constexpr):
        q_desc, k_desc, v_desc = descs
        q_bufs, k_bufs, v_bufs = bufs
        q_ready, k_ready, v_ready, k_empty, v_empty = bars
        o_base, lse_base, stride_ot = out
        b, q_col, kv_col, m_start, q_len, k_len, first, n_tiles, qk_scale, causal_shift, lse_len = pos
        BN: gl.constexpr = k_desc.block_type.shape[1]
        HEAD_D: gl.constexpr = k_desc.block_type.shape[2]
        R: gl.constexpr = q_desc.block_type.shape[1]
        STAGE_COUNT: gl.constexpr = k_bufs.type.shape[0]
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, BN, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, HEAD_D, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        # The last key each query may see: its own position when causal, past every key when not
        # (causal_shift 2**30: flags passed to partitions must be runtime values here). Tiles
        # below n_full are wholly visible to all R queries; n_mine tiles hold any visible key.
        row0 = first + HALF * R + causal_shift
        n_full = gl.minimum((row0 + 1) // BN, k_len // BN)
        n_mine = gl.cdiv(gl.minimum(k_len, row0 + R), BN)
        q_limit = row0 + gl.arange(0, R, layout=gl.SliceLayout(1, s_layout))

        mbarrier.wait(q_ready, 0)
        q_smem = q_bufs.index(HALF).reshape([R, HEAD_D])
        # Tile 0 alone (masked: it may be the diagonal), so that the loops always hold a P @ V
        # of the previous tile to issue.
        s = warpgroup_mma_wait(num_outstanding=0, deps=(_scores(q_smem, k_bufs, k_ready, 0, s_layout), ))
        mbarrier.arrive(k_empty.index(0), count=1)
        m_i = gl.full([R], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
        l_i = gl.zeros([R], gl.float32, gl.SliceLayout(1, s_layout))
        p, alpha, l_i, m_i = _softmax(l_i, m_i, s, 0, q_limit, k_len, qk_scale, True, s_layout, o_layout)
        p = gl.convert_layout(p.to(q_smem.dtype), p_layout)
        acc = gl.zeros([R, HEAD_D], gl.float32, o_layout)
        acc, l_i, m_i, p = _consume_tiles(acc, l_i, m_i, p, q_smem, k_bufs, v_bufs, bars, 1, n_full,
                                          q_limit, k_len, qk_scale, False, s_layout, o_layout)
        acc, l_i, m_i, p = _consume_tiles(acc, l_i, m_i, p, q_smem, k_bufs, v_bufs, bars,
                                          gl.maximum(n_full, 1), n_mine, q_limit, k_len, qk_scale, True,
                                          s_layout, o_layout)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(_add_values(acc, p, v_bufs, v_ready, n_mine - 1), ))
        mbarrier.arrive(v_empty.index((n_mine - 1) % STAGE_COUNT), count=1)
        # Tiles the other warpgroup still needs but wholly above this one's diagonal: wait until
        # each is loaded (so the arrivals count toward its round), then release it.
        for i in range(n_mine, n_tiles):
            mbarrier.wait(k_ready.index(i % STAGE_COUNT), (i // STAGE_COUNT) & 1)
            mbarrier.arrive(k_empty.index(i % STAGE_COUNT), count=1)
            mbarrier.arrive(v_empty.index(i % STAGE_COUNT), count=1)

        seen = l_i > 0.0
        inv = gl.convert_layout(1.0 / gl.where(seen, l_i, 1.0), gl.SliceLayout(1, o_layout))
        rows = m_start + HALF * R + gl.arange(0, R, layout=gl.SliceLayout(1, o_layout))
        cols = gl.arange(0, HEAD_D, layout=gl.SliceLayout(0, o_layout))
        o_ptrs = o_base + rows[:, None].to(gl.int64) * stride_ot + cols[None, :]
        gl.store(o_ptrs, (acc * inv[:, None]).to(o_base.dtype.element_ty), mask=rows[:, None] < q_len)
        lse = gl.where(seen, (m_i + gl.log2(gl.where(seen, l_i, 1.0))) * 0.6931471805599453,
                       float("-inf"))
        lse_rows = m_start + HALF * R + gl.arange(0, R, layout=gl.SliceLayout(1, s_layout))
        gl.store(lse_base + lse_rows, lse, mask=lse_rows < lse_len)  # lse_len 0: no log-sum-exp

    @gluon.jit
    def _consumer_low(descs, bufs, bars, out, pos):
        _consumer(descs, bufs, bars, out, pos, 0)

    @gluon.jit
    def _consumer_high(descs, bufs, bars, out, pos):
        _consumer(descs, bufs, bars, out, pos, 1)

    @gluon.jit
    def _prefill_kernel(q_desc, k_desc, v_desc, O, LSE, stride_ob, stride_ot, stride_oh,
                        q_len, k_len, q_offset, q_heads, group, qk_scale, causal_shift, lse_len,
                        KS, VS, stride_sb, stride_st, stride_sh,
                        STAGE_COUNT: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                        PRODUCER_REGS: gl.constexpr, FP8: gl.constexpr, FP8_STAGE_COUNT: gl.constexpr):
        """FP8: k_desc, v_desc read an e4m3 cache whose scales are KS, VS [B, T, Hkv] (strides
        stride_s*); the consumers' stages hold K/V in q's dtype either way."""
        R: gl.constexpr = q_desc.block_type.shape[1]
        BN: gl.constexpr = k_desc.block_type.shape[1]
        HEAD_D: gl.constexpr = k_desc.block_type.shape[2]
        # Heaviest causal blocks (the last queries) launch first, so the short ones fill the tail.
        m_start = (gl.num_programs(0) - 1 - gl.program_id(0)) * (2 * R)
        bh = gl.program_id(1)
        b = bh // q_heads
        h = bh % q_heads
        first = q_offset + m_start  # absolute position of the program's first query
        n_tiles = gl.cdiv(gl.minimum(k_len, first + 2 * R + causal_shift), BN)
        o_base = O + b.to(gl.int64) * stride_ob + h.to(gl.int64) * stride_oh
        lse_base = LSE + bh.to(gl.int64) * q_len
        pos = (b, h * HEAD_D, (h // group) * HEAD_D, m_start, q_len, k_len, first, n_tiles, qk_scale,
               causal_shift, lse_len)

        q_bufs = gl.allocate_shared_memory(q_desc.dtype, [2, 1, R, HEAD_D], q_desc.layout)
        kv_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=3)
        k_bufs = gl.allocate_shared_memory(q_desc.dtype, [STAGE_COUNT, 1, BN, HEAD_D], kv_layout)
        v_bufs = gl.allocate_shared_memory(q_desc.dtype, [STAGE_COUNT, 1, BN, HEAD_D], kv_layout)
        q_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        k_ready = gl.allocate_shared_memory(gl.int64, [STAGE_COUNT, 1], mbarrier.MBarrierLayout())
        v_ready = gl.allocate_shared_memory(gl.int64, [STAGE_COUNT, 1], mbarrier.MBarrierLayout())
        k_empty = gl.allocate_shared_memory(gl.int64, [STAGE_COUNT, 1], mbarrier.MBarrierLayout())
        v_empty = gl.allocate_shared_memory(gl.int64, [STAGE_COUNT, 1], mbarrier.MBarrierLayout())
        mbarrier.init(q_ready, count=1)
        for i in gl.static_range(STAGE_COUNT):
            mbarrier.init(k_ready.index(i), count=1)
            mbarrier.init(v_ready.index(i), count=1)
            mbarrier.init(k_empty.index(i), count=2)  # both consumer warpgroups release a stage
            mbarrier.init(v_empty.index(i), count=2)
        fence_async_shared()

        args = ((q_desc, k_desc, v_desc), (q_bufs, k_bufs, v_bufs),
                (q_ready, k_ready, v_ready, k_empty, v_empty), (o_base, lse_base, stride_ot), pos)
        if FP8:
            k8_bufs = gl.allocate_shared_memory(k_desc.dtype, [FP8_STAGE_COUNT, 1, BN, HEAD_D],
                                                k_desc.layout)
            v8_bufs = gl.allocate_shared_memory(v_desc.dtype, [FP8_STAGE_COUNT, 1, BN, HEAD_D],
                                                v_desc.layout)
            scale_bufs = gl.allocate_shared_memory(gl.float32, [2, BN],
                                                   gl.SwizzledSharedLayout(1, 1, 1, [0]))
            k8_ready = gl.allocate_shared_memory(gl.int64, [FP8_STAGE_COUNT, 1], mbarrier.MBarrierLayout())
            v8_ready = gl.allocate_shared_memory(gl.int64, [FP8_STAGE_COUNT, 1], mbarrier.MBarrierLayout())
            for i in gl.static_range(FP8_STAGE_COUNT):
                mbarrier.init(k8_ready.index(i), count=1)
                mbarrier.init(v8_ready.index(i), count=1)
            fence_async_shared()
            kv_h = (h // group).to(gl.int64)
            ks_base = KS + b.to(gl.int64) * stride_sb + kv_h * stride_sh
            vs_base = VS + b.to(gl.int64) * stride_sb + kv_h * stride_sh
            fp8 = (k8_bufs, v8_bufs, k8_ready, v8_ready, scale_bufs, ks_base, vs_base, stride_st)
            gl.warp_specialize([(_consumer_low, args), (_consumer_high, args),
                                (producer_fp8, args + (fp8, ))], [4, 4], [CONSUMER_REGS, PRODUCER_REGS])
        else:
            gl.warp_specialize([(_consumer_low, args), (_consumer_high, args), (_producer, args)],
                               [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


# Each variant's first launch (False: 16-bit K/V, True: fp8), for this process.
_launch = {fp8: {"checked": False, "failed": None} for fp8 in (False, True)}


def _variant(k) -> dict:
    return _launch[k.dtype == torch.float8_e4m3fn]


def _takes_queries(q, fp8: bool) -> bool:
    """sm90, fp16/bf16 q, D in HEAD_DIMS, and the variant (fp8: allowed by the run rules,
    policy.HOPPER_PREFILL_READS_FP8) has not failed to start."""
    return (GLUON and (policy.HOPPER_PREFILL_READS_FP8 or not fp8) and _launch[fp8]["failed"] is None
            and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
            and torch.cuda.get_device_capability(q.device)[0] == 9 and q.shape[3] in HEAD_DIMS)


def takes_fp8(q) -> bool:
    """Whether fp8 K/V with queries like q go to this kernel, which then runs at about its 16-bit
    speed."""
    return _takes_queries(q, fp8=True)


def supports(q, k, v) -> bool:
    """Whether the Hopper kernel takes these inputs: queries it takes (`_takes_queries`), and q, k,
    v readable by the copy engine as [B, T, H * D] (heads packed, 16-byte aligned strides). k and
    v are q's dtype or float8_e4m3fn (with scales)."""
    if not _takes_queries(q, fp8=k.dtype == torch.float8_e4m3fn):
        return False
    return all(t.stride(3) == 1 and t.stride(2) == t.shape[3] and t.data_ptr() % 16 == 0
               and all(s * t.element_size() % 16 == 0 for s in t.stride()[:2]) for t in (q, k, v))


def prefill_or_fall_back(fallback, q, k, v, **kwargs):
    """`prefill_attention_hopper`, except that when its first launch in this process fails (a
    compiler, driver or ptxas it was not checked with), it warns once and `fallback` serves this
    call and every later one. Bad inputs (ValueError) still raise, and so does any failure after a
    first launch that worked."""
    launch = _variant(k)
    if launch["checked"]:
        return prefill_attention_hopper(q, k, v, **kwargs)
    try:
        result = prefill_attention_hopper(q, k, v, **kwargs)
    except ValueError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure to build or start the kernel
        launch["failed"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        warnings.warn(f"facli: the Hopper prefill kernel did not start ({launch['failed'][:200]}); "
                      "prefill uses the Triton kernel from now on", RuntimeWarning, stacklevel=2)
        return fallback(q, k, v, **kwargs)
    launch["checked"] = True
    return result


def _descriptor(t, rows):
    """t [B, T, H, D] as the copy engine's [B, T, H * D]: a tile never crosses into another
    sequence, and rows past T read as zeros."""
    batch, seq, heads, d = t.shape
    block = [1, rows, d]
    dtype = {torch.float16: gl.float16, torch.bfloat16: gl.bfloat16,
             torch.float8_e4m3fn: gl.float8e4nv}[t.dtype]
    layout = gl.NVMMASharedLayout.get_default_for(block, dtype)
    return TensorDescriptor(t, [batch, seq, heads * d], [t.stride(0), t.stride(1), 1], block, layout)


def prefill_attention_hopper(q, k, v, *, causal=True, q_offset=0, scale=None, return_lse=False,
                             k_scales=None, v_scales=None):
    """Hopper prefill attention; arguments and result as `prefill_attention_triton` (fp8 k, v with
    their scales included). The caller checks `supports(q, k, v)` first."""
    fp8 = common.check_fp8_scales(k, v, k_scales, v_scales)
    common.check_attention_inputs(q, k, v, fp8_cache=fp8)
    common.check_q_offset(q_offset)
    batch, q_len, q_heads, head_dim = q.shape
    k_len, kv_heads = k.shape[1], k.shape[2]
    out = common.empty(batch, q_len, q_heads, head_dim, dtype=q.dtype, device=q.device)
    lse = common.empty(batch, q_heads, q_len if return_lse else 1, dtype=torch.float32, device=q.device)
    if q_len == 0 or k_len == 0:
        if k_len == 0:
            out.zero_()
            if return_lse:
                lse.fill_(float("-inf"))
        return (out, lse) if return_lse else out
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    grid = (triton.cdiv(q_len, BLOCK_M), batch * q_heads)
    k_s, v_s = (k_scales, v_scales) if fp8 else (lse, lse)  # read only with fp8
    _prefill_kernel[grid](
        _descriptor(q, ROWS), _descriptor(k, BLOCK_N), _descriptor(v, BLOCK_N), out, lse,
        out.stride(0), out.stride(1), out.stride(2),
        q_len, k_len, q_offset, q_heads, q_heads // kv_heads, scale * LOG2E,
        0 if causal else NOT_CAUSAL_SHIFT, q_len if return_lse else 0,
        k_s, v_s, *(k_scales.stride() if fp8 else (0, 0, 0)), STAGE_COUNT=STAGES,
        CONSUMER_REGS=FP8_CONSUMER_REGS if fp8 else CONSUMER_REGS,
        PRODUCER_REGS=FP8_PRODUCER_REGS if fp8 else PRODUCER_REGS, FP8=fp8,
        FP8_STAGE_COUNT=FP8_STAGES, num_warps=4, maxnreg=MAX_REGS,
    )
    return (out, lse) if return_lse else out
