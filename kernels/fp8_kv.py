"""The fp8 (e4m3) KV cache's elementwise kernels, each one pass over its bytes where PyTorch takes
a dozen small kernels or float32 temporaries, with PyTorch's results bit for bit:

- `store_token_fp8_triton`: one decode token's K and V quantized and stored at a cache position
  held on the device (`facli.offload.fp8.quantize` on the GPU: the same float32 amax, divisions
  rounded as PyTorch's CUDA kernels round them, clamp and round-to-nearest-even cast);
- `store_rows_fp8_triton`: a prefill chunk's K and V quantized the same way and stored at
  positions start..start+T, where PyTorch makes half a dozen float32 passes over the chunk;
- `dequantize_rows_triton`: rows of values times their scales, rounded once to the output dtype
  (`facli.offload.fp8.dequantize_into`), for attention over an fp8 prefix in prefill.
"""

import triton
import triton.language as tl

# 1 / 448 (e4m3's largest value) in float32. PyTorch's CUDA division by a scalar multiplies by the
# scalar's float32 reciprocal, so fp8.quantize's scales on a GPU are amax times this.
INV_E4M3_MAX = tl.constexpr(1.0 / 448.0)


@triton.jit
def _quantize_rows(x_at, values_at, scales_at, ok, row_ok):
    """Rows of head vectors (x_at, values_at: [R, D] pointers; scales_at: [R]) quantized."""
    x = tl.load(x_at, mask=ok, other=0.0).to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(x), 1), 1e-12) * INV_E4M3_MAX
    # Division by a tensor is IEEE's, rounded to nearest, in PyTorch as here.
    y = tl.minimum(tl.maximum(tl.math.div_rn(x, scale[:, None]), -448.0), 448.0)
    tl.store(values_at, y.to(values_at.dtype.element_ty), mask=ok)
    tl.store(scales_at, scale, mask=row_ok)


@triton.jit
def _quantize_row(x_row, values_row, scale_at, offs, ok):
    one = tl.arange(0, 1)
    _quantize_rows(x_row + offs[None, :], values_row + offs[None, :], scale_at + one,
                   ok[None, :], one < 1)


@triton.jit
def _store_token_kernel(K, V, KQ, VQ, KS, VS, POS, stride_pos,
                        stride_kb, stride_kh, stride_vb, stride_vh,
                        stride_cb, stride_ct, stride_ch, stride_sb, stride_st, stride_sh,
                        kv_heads, head_dim, BLOCK_D: tl.constexpr):
    bh = tl.program_id(0)
    b = (bh // kv_heads).to(tl.int64)
    h = (bh % kv_heads).to(tl.int64)
    pos = tl.load(POS + b * stride_pos).to(tl.int64)
    offs = tl.arange(0, BLOCK_D)
    ok = offs < head_dim
    cache_at = b * stride_cb + pos * stride_ct + h * stride_ch
    scale_at = b * stride_sb + pos * stride_st + h * stride_sh
    _quantize_row(K + b * stride_kb + h * stride_kh, KQ + cache_at, KS + scale_at, offs, ok)
    _quantize_row(V + b * stride_vb + h * stride_vh, VQ + cache_at, VS + scale_at, offs, ok)


def store_token_fp8_triton(k, v, k_cache, v_cache, k_scales, v_scales, position):
    """k, v [B, 1, Hkv, D] -> k_cache, v_cache [B, T, Hkv, D] float8_e4m3fn and their float32
    scales [B, T, Hkv] at `position`, an integer tensor on the caches' device: one element (every
    sequence at that position) or B (one position per sequence)."""
    batch, steps, kv_heads, head_dim = k.shape
    if steps != 1 or v.shape != k.shape:
        raise ValueError(f"expected k and v [B, 1, Hkv, D], got {tuple(k.shape)} and {tuple(v.shape)}")
    if k_cache.stride() != v_cache.stride() or k_scales.stride() != v_scales.stride():
        raise ValueError("expected the K and V caches (and their scales) with the same strides")
    if k.stride(-1) != 1 or v.stride(-1) != 1 or k_cache.stride(-1) != 1:
        raise ValueError("expected a unit stride in the head dim")
    if position.numel() not in (1, batch) or position.device != k_cache.device:
        raise ValueError(f"expected 1 or {batch} positions on {k_cache.device}, got "
                         f"{position.numel()} on {position.device}")
    _store_token_kernel[(batch * kv_heads,)](
        k, v, k_cache, v_cache, k_scales, v_scales, position,
        position.stride(0) if position.numel() > 1 else 0,
        k.stride(0), k.stride(2), v.stride(0), v.stride(2),
        *k_cache.stride()[:3], *k_scales.stride(), kv_heads, head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim), num_warps=1)


@triton.jit
def _store_rows_kernel(K, V, KQ, VQ, KS, VS, start, rows, kv_heads, head_dim,
                       stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
                       stride_cb, stride_ct, stride_ch, stride_sb, stride_st, stride_sh,
                       BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (row block, b): BLOCK_R rows (t, h) of sequence b, K and V."""
    b = tl.program_id(1).to(tl.int64)
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    t, h = r // kv_heads, r % kv_heads
    offs = tl.arange(0, BLOCK_D)
    row_ok = r < rows
    ok = row_ok[:, None] & (offs[None, :] < head_dim)
    cache_at = (b * stride_cb + (start + t) * stride_ct + h * stride_ch)[:, None] + offs[None, :]
    scale_at = b * stride_sb + (start + t) * stride_st + h * stride_sh
    k_at = (b * stride_kb + t * stride_kt + h * stride_kh)[:, None] + offs[None, :]
    v_at = (b * stride_vb + t * stride_vt + h * stride_vh)[:, None] + offs[None, :]
    _quantize_rows(K + k_at, KQ + cache_at, KS + scale_at, ok, row_ok)
    _quantize_rows(V + v_at, VQ + cache_at, VS + scale_at, ok, row_ok)


def store_rows_fp8_triton(k, v, k_cache, v_cache, k_scales, v_scales, start: int) -> None:
    """k, v [B, T, Hkv, D] -> k_cache, v_cache [B, capacity, Hkv, D] float8_e4m3fn and their
    float32 scales [B, capacity, Hkv] at positions start..start+T, as fp8.quantize makes them
    on the GPU."""
    batch, steps, kv_heads, head_dim = k.shape
    if v.shape != k.shape or start < 0 or start + steps > k_cache.shape[1]:
        raise ValueError(f"expected k and v [B, T, Hkv, D] within the cache's {k_cache.shape[1]} "
                         f"positions from {start}, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k_cache.stride() != v_cache.stride() or k_scales.stride() != v_scales.stride():
        raise ValueError("expected the K and V caches (and their scales) with the same strides")
    if k.stride(-1) != 1 or v.stride(-1) != 1 or k_cache.stride(-1) != 1:
        raise ValueError("expected a unit stride in the head dim")
    rows, block_r = steps * kv_heads, 32
    _store_rows_kernel[(triton.cdiv(rows, block_r), batch)](
        k, v, k_cache, v_cache, k_scales, v_scales, start, rows, kv_heads, head_dim,
        *k.stride()[:3], *v.stride()[:3], *k_cache.stride()[:3], *k_scales.stride(),
        BLOCK_R=block_r, BLOCK_D=triton.next_power_of_2(head_dim), num_warps=4)


@triton.jit
def _dequantize_kernel(VALUES, SCALES, OUT, stride_vb, stride_sb, stride_st, stride_sh, stride_ob,
                       rows, heads, head_dim, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (row block, b): rows (t, h) of one sequence, D values each."""
    b = tl.program_id(1).to(tl.int64)
    offs_r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_r[:, None] < rows) & (offs_d[None, :] < head_dim)
    at = offs_r[:, None] * head_dim + offs_d[None, :]
    x = tl.load(VALUES + b * stride_vb + at, mask=ok, other=0.0).to(tl.float32)
    scale_at = b * stride_sb + (offs_r // heads) * stride_st + (offs_r % heads) * stride_sh
    scale = tl.load(SCALES + scale_at, mask=offs_r < rows, other=0.0)
    tl.store(OUT + b * stride_ob + at, (x * scale[:, None]).to(OUT.dtype.element_ty), mask=ok)


def _rows_packed(t, heads, head_dim):
    """True if t [B, T, H, D] (or [B, T, H] with head_dim 1) holds each sequence's (t, h) rows
    back to back."""
    return t.stride(-1) == 1 and t.stride(2) == head_dim and t.stride(1) == heads * head_dim


def dequantize_rows_triton(out, values, scales) -> bool:
    """out[:] = values * scales[..., None], rounded once to out's dtype: values [B, T, H, D]
    float8_e4m3fn, scales [B, T, H] float32 (any strides), out [B, T, H, D] on the same GPU.
    Returns False (and does nothing) where values' or out's rows are not packed per sequence."""
    batch, length, heads, head_dim = values.shape
    if not (_rows_packed(values, heads, head_dim) and _rows_packed(out, heads, head_dim)):
        return False
    rows = length * heads
    block_r = 64
    _dequantize_kernel[(triton.cdiv(rows, block_r), batch)](
        values, scales, out, values.stride(0), *scales.stride(), out.stride(0), rows, heads,
        head_dim, BLOCK_R=block_r, BLOCK_D=triton.next_power_of_2(head_dim), num_warps=4)
    return True
