"""The fp8 KV kernels against PyTorch: a prefill chunk's store (the bytes and scales of
fp8.quantize) and the dequantization of cache rows."""

import pytest
import torch
from conftest import requires_cuda

from facli.kernels.fp8_kv import dequantize_rows_triton, store_rows_fp8_triton
from facli.offload.fp8 import FP8, quantize

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def caches(batch, length, kv_heads, head_dim, device):
    values = [torch.full((batch, length, kv_heads, head_dim), 0x55, dtype=torch.uint8,
                         device=device).view(FP8) for _ in range(2)]
    scales = [torch.full((batch, length, kv_heads), -1.0, device=device) for _ in range(2)]
    return values, scales


def _chunk(batch, steps, kv_heads, head_dim, dtype, device):
    """K and V as views into one projection output (as the model's attention makes them), with
    head vectors over ten decades and a zero vector."""
    kv = torch.randn(batch, steps, 2 * kv_heads, head_dim, device=device)
    kv *= torch.logspace(-6, 4, 2 * kv_heads, device=device).view(1, 1, -1, 1)
    kv[0, 0, 1] = 0.0
    kv = kv.to(dtype)
    return kv[:, :, :kv_heads], kv[:, :, kv_heads:]


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("head_dim", [64, 80, 128])
def test_chunk_store_has_the_bytes_and_scales_of_quantize(dtype, head_dim):
    batch, capacity, kv_heads, start, steps = 2, 300, 4, 37, 201
    k, v = _chunk(batch, steps, kv_heads, head_dim, dtype, "cuda")
    (k_cache, v_cache), (k_scales, v_scales) = caches(batch, capacity, kv_heads, head_dim, "cuda")
    store_rows_fp8_triton(k, v, k_cache, v_cache, k_scales, v_scales, start)
    rows = slice(start, start + steps)
    for cache, scales, x in ((k_cache, k_scales, k), (v_cache, v_scales, v)):
        values, expected_scales = quantize(x)
        assert torch.equal(cache[:, rows].view(torch.uint8), values.view(torch.uint8))
        assert torch.equal(scales[:, rows], expected_scales)
        assert (cache[:, :start].view(torch.uint8) == 0x55).all()
        assert (cache[:, start + steps:].view(torch.uint8) == 0x55).all()
        assert (scales[:, :start] == -1).all() and (scales[:, start + steps:] == -1).all()


def test_chunk_store_places_float64_scales_at_its_positions():
    """The interpreted kernel (CPU lanes): each head vector's scale, to float32 rounding of a
    float64 amax / 448, at positions start..start+T and nowhere else. Its e4m3 bytes are checked
    on the GPU only: the interpreter's float8 cast drops the carry of a mantissa rounded up to
    the next power of two (124.3 becomes 64, not 128)."""
    batch, capacity, kv_heads, head_dim, start, steps = 2, 50, 3, 64, 5, 40
    k, v = _chunk(batch, steps, kv_heads, head_dim, torch.float32, DEVICE)
    (k_cache, v_cache), (k_scales, v_scales) = caches(batch, capacity, kv_heads, head_dim, DEVICE)
    store_rows_fp8_triton(k, v, k_cache, v_cache, k_scales, v_scales, start)
    rows = slice(start, start + steps)
    for cache, scales, x in ((k_cache, k_scales, k), (v_cache, v_scales, v)):
        want = x.double().abs().amax(-1).clamp_min(1e-12) / 448
        torch.testing.assert_close(scales[:, rows].double(), want, rtol=2e-7, atol=0)
        assert (cache[:, :start].view(torch.uint8) == 0x55).all()
        assert (cache[:, start + steps:].view(torch.uint8) == 0x55).all()
        assert (scales[:, :start] == -1).all() and (scales[:, start + steps:] == -1).all()


@pytest.mark.parametrize("head_major_scales", [False, True], ids=["by-position", "by-head"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_dequantize_rows_as_pytorch(dtype, head_major_scales):
    """Rows of a cache slice (the layout the prefill reads), against values * scales in PyTorch;
    scales stored by position or by head (as a GPU KV store holds them)."""
    if DEVICE == "cpu" and dtype != torch.float32:
        pytest.skip("the interpreted lane runs float32")
    batch, capacity, heads, head_dim, first, stop = 2, 300, 3, 80, 37, 251
    values = (torch.randn(batch, capacity, heads, head_dim, device=DEVICE) * 100).clamp(-448, 448)
    values = values.to(FP8)
    scales = torch.rand(batch, capacity, heads, device=DEVICE) * 10 + 1e-3
    if head_major_scales:
        scales = scales.transpose(1, 2).contiguous().transpose(1, 2)
    slot = torch.full((batch, capacity, heads, head_dim), float("nan"), dtype=dtype, device=DEVICE)
    out = slot[:, first:stop]
    assert dequantize_rows_triton(out, values[:, first:stop], scales[:, first:stop])
    expected = (values[:, first:stop].float() * scales[:, first:stop, :, None]).to(dtype)
    assert torch.equal(out, expected)
    assert slot[:, :first].isnan().all() and slot[:, stop:].isnan().all()


def test_dequantize_rows_leaves_unpacked_layouts_to_pytorch():
    values = torch.zeros(1, 8, 4, 64, device=DEVICE).to(FP8)
    out = torch.empty(1, 8, 4, 64, device=DEVICE)
    assert not dequantize_rows_triton(out, values[:, :, ::2], torch.ones(1, 8, 2, device=DEVICE))
