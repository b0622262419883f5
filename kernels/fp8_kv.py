"""The fp8 (e4m3) KV cache's elementwise kernels, each one pass over its bytes where PyTorch takes
a dozen small kernels or float32 temporaries, with PyTorch's results bit for bit:

- `store_rows_fp8_triton`: a prefill chunk's K and V quantized and stored at positions
  start..start+T, as `facli.offload.fp8.quantize` makes them on the GPU (the same float32 amax,
  divisions rounded as PyTorch's CUDA kernels round them, clamp and round-to-nearest-even cast),
  where PyTorch makes half a dozen float32 passes over the chunk (a decode token's K and V are
  quantized the same way by `token_store`, together with the rotary embedding);
- `dequantize_rows_triton`: rows of values times their scales, rounded once to the output dtype
  (`facli.offload.fp8.dequantize_into`), for attention over an fp8 prefix in prefill.
"""

import triton
import triton.language as tl

# 1 / 448 (e4m3's largest value) in float32. PyTorch's CUDA division by a scalar multiplies by the
# scalar's float32 reciprocal, so fp8.quantize's scales on a GPU are amax times this.
INV_E4M3_MAX = tl.constexpr(1.0 / 448.0)


@triton.jit
def e4m3_scale(amax):
    """The scale that maps a head vector's largest magnitude (float32) to 448."""
    return tl.maximum(amax, 1e-12) * INV_E4M3_MAX


@triton.jit
def to_e4m3(x, scale, dtype):
    """x / scale (float32, scale broadcast) clamped to e4m3's range and cast to `dtype`."""
    # Division by a tensor is IEEE's, rounded to nearest, in PyTorch as here.
    return tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -448.0), 448.0).to(dtype)


@triton.jit
def _quantize_rows(x_at, values_at, scales_at, ok, row_ok):
    """Rows of head vectors (x_at, values_at: [R, D] pointers; scales_at: [R]) quantized."""
    x = tl.load(x_at, mask=ok, other=0.0).to(tl.float32)
    scale = e4m3_scale(tl.max(tl.abs(x), 1))
    tl.store(values_at, to_e4m3(x, scale[:, None], values_at.dtype.element_ty), mask=ok)
    tl.store(scales_at, scale, mask=row_ok)


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
