"""The fp8 producer of the Hopper prefill kernel (`prefill_hopper`): one partition of four warps
that brings e4m3 K/V tiles into their own shared-memory ring with the copy engine and writes each
tile times its rows' scales, in float32 rounded once to q's dtype, into the 16-bit stage the
consumer warpgroups read. Those are the values `dequantize_fp8` makes, so the consumers compute
over an fp8 cache exactly what they compute over its dequantized copy, which is never made.

Imported by `prefill_hopper` only where Gluon's Hopper ops are present.
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma

DEQUANT_ROWS = gl.constexpr(16)  # rows per dequantizing step: 16 e4m3 bytes a thread, one load


@gluon.jit
def _load_e4m3(desc, bufs, ready, b, tile, kv_col):
    stage = tile % bufs.type.shape[0]
    mbarrier.expect(ready.index(stage), desc.block_type.nbytes)
    tma.async_copy_global_to_shared(desc, [b, tile * desc.block_type.shape[1], kv_col],
                                    ready.index(stage), bufs.index(stage))


@gluon.jit
def _dequantize_tile(src, dst, scale_smem, layout: gl.constexpr):
    """dst [BN, D] (16-bit, shared) = src (e4m3, shared) times scale_smem's [BN] row scales,
    in float32 rounded once, DEQUANT_ROWS rows at a time (few registers: the consumers keep
    the rest)."""
    BN: gl.constexpr = src.type.shape[0]
    for c in gl.static_range(BN // DEQUANT_ROWS):
        scale = scale_smem.slice(c * DEQUANT_ROWS, DEQUANT_ROWS).load(gl.SliceLayout(1, layout))
        values = src.slice(c * DEQUANT_ROWS, DEQUANT_ROWS).load(layout).to(gl.float32)
        dst.slice(c * DEQUANT_ROWS, DEQUANT_ROWS).store((values * scale[:, None]).to(dst.dtype))


@gluon.jit
def producer_fp8(descs, bufs, bars, out, pos, fp8):
    """The producer over an fp8 cache: e4m3 tiles by the copy engine into their ring, each
    dequantized into the 16-bit stage the consumers wait on. A tile's scales are read from
    global memory before waiting for its bytes, so their latency hides behind the wait."""
    q_desc, k_desc, v_desc = descs
    q_bufs, k_bufs, v_bufs = bufs
    q_ready, k_ready, v_ready, k_empty, v_empty = bars
    k8_bufs, v8_bufs, k8_ready, v8_ready, scale_bufs, ks_base, vs_base, stride_st = fp8
    b, q_col, kv_col, m_start, q_len, k_len, first, n_tiles, qk_scale, causal_shift, lse_len = pos
    BN: gl.constexpr = k_desc.block_type.shape[1]
    HEAD_D: gl.constexpr = k_desc.block_type.shape[2]
    STAGE_COUNT: gl.constexpr = k_bufs.type.shape[0]
    F8: gl.constexpr = k8_bufs.type.shape[0]
    layout: gl.constexpr = gl.BlockedLayout([1, 16], [4, 8], [gl.num_warps(), 1], [1, 0])
    rows_layout: gl.constexpr = gl.BlockedLayout([1], [32], [gl.num_warps()], [0])
    mbarrier.expect(q_ready, 2 * q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [b, m_start, q_col], q_ready, q_bufs.index(0))
    tma.async_copy_global_to_shared(q_desc, [b, m_start + q_desc.block_type.shape[1], q_col],
                                    q_ready, q_bufs.index(1))
    for j in gl.static_range(F8):
        if j < n_tiles:
            _load_e4m3(k_desc, k8_bufs, k8_ready, b, j, kv_col)
            _load_e4m3(v_desc, v8_bufs, v8_ready, b, j, kv_col)
    for i in range(n_tiles):
        stage = i % STAGE_COUNT
        empty_phase = ((i // STAGE_COUNT) & 1) ^ 1
        f = i % F8
        rows = i * BN + gl.arange(0, BN, layout=rows_layout)
        in_cache = rows < k_len
        k_scales = gl.load(ks_base + rows.to(gl.int64) * stride_st, mask=in_cache, other=0.0)
        v_scales = gl.load(vs_base + rows.to(gl.int64) * stride_st, mask=in_cache, other=0.0)
        scale_bufs.index(0).store(k_scales)
        scale_bufs.index(1).store(v_scales)
        mbarrier.wait(k8_ready.index(f), (i // F8) & 1)
        mbarrier.wait(k_empty.index(stage), empty_phase)
        _dequantize_tile(k8_bufs.index(f).reshape([BN, HEAD_D]),
                         k_bufs.index(stage).reshape([BN, HEAD_D]), scale_bufs.index(0), layout)
        fence_async_shared()  # the consumers' wgmma reads through the async proxy
        mbarrier.arrive(k_ready.index(stage), count=1)
        mbarrier.wait(v8_ready.index(f), (i // F8) & 1)
        mbarrier.wait(v_empty.index(stage), empty_phase)
        _dequantize_tile(v8_bufs.index(f).reshape([BN, HEAD_D]),
                         v_bufs.index(stage).reshape([BN, HEAD_D]), scale_bufs.index(1), layout)
        fence_async_shared()
        mbarrier.arrive(v_ready.index(stage), count=1)
        if i + F8 < n_tiles:  # the e4m3 stage is read: refill it
            _load_e4m3(k_desc, k8_bufs, k8_ready, b, i + F8, kv_col)
            _load_e4m3(v_desc, v8_bufs, v8_ready, b, i + F8, kv_col)
