"""Decode's matrix-vector kernel against a float64 product, and `linear`'s dispatch."""

import pytest
import torch
import torch.nn.functional as F

from conftest import requires_cuda
from kernel_checks import poison_allocations

from facli.kernels import gemv, gemv_triton

CPU_DTYPES = [torch.float32, torch.float16]  # the interpreter's bf16 arithmetic is wrong
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU tensors need the interpreter


def check(n, k, dtype, device, bias, config=None, monkeypatch=None):
    if monkeypatch is not None:
        poison_allocations(monkeypatch)
    generator = torch.Generator(device=device).manual_seed(n + k)
    weight = (torch.randn(n, k, device=device, generator=generator) / k**0.5).to(dtype)
    x = torch.randn(1, 1, k, device=device, generator=generator).to(dtype)
    b = torch.randn(n, device=device, generator=generator).to(dtype) if bias else None
    out = gemv_triton.gemv_triton(x, weight, b, config)
    want = F.linear(x.double(), weight.double(), None if b is None else b.double())
    assert out.shape == (1, 1, n) and out.dtype == dtype
    # float32 accumulation over K, then one rounding to the output dtype.
    tolerance = 4 * torch.finfo(dtype).eps if dtype != torch.float32 else 1e-5
    torch.testing.assert_close(out.double(), want, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("n, k", [(37, 96), (64, 1024), (5, 700)], ids=["ragged-rows", "even", "ragged-k"])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_interpreted_against_float64(n, k, dtype, bias, monkeypatch):
    config = gemv_triton.GemvConfig(block_n=8, block_k=64, num_warps=4)
    check(n, k, dtype, DEVICE, bias, config, monkeypatch)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n, k", [(12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008),
                                  (32000, 4096), (1000, 4000)])
def test_llama_projections_on_the_gpu(n, k, dtype, monkeypatch):
    check(n, k, dtype, "cuda", bias=n == 1000, monkeypatch=monkeypatch)


@pytest.mark.parametrize("dtype", CPU_DTYPES if DEVICE == "cpu" else [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_residual_is_added_to_the_rounded_product_as_pytorch_adds(dtype, bias, monkeypatch):
    """linear(x, W, b, residual) is linear(x, W, b) + residual bit for bit: the product rounded
    to the dtype, then the sum rounded (a decoder layer's down projection and its residual)."""
    poison_allocations(monkeypatch)
    n, k = 48, 320
    config = gemv_triton.GemvConfig(block_n=8, block_k=64, num_warps=4)
    weight = (torch.randn(n, k, device=DEVICE) / k**0.5).to(dtype)
    x = torch.randn(1, 1, k, device=DEVICE).to(dtype)
    b = torch.randn(n, device=DEVICE).to(dtype) if bias else None
    residual = (torch.randn(1, 1, n, device=DEVICE) * 8).to(dtype)
    out = gemv_triton.gemv_triton(x, weight, b, config, residual=residual)
    assert torch.equal(out, gemv_triton.gemv_triton(x, weight, b, config) + residual)
    with pytest.raises(ValueError, match="residual of 48 values"):
        gemv_triton.gemv_triton(x, weight, b, config, residual=residual[..., :4])


def test_linear_adds_the_residual_on_every_path():
    weight, x, residual = torch.randn(8, 16), torch.randn(3, 16), torch.randn(3, 8)
    assert torch.equal(gemv.linear(x, weight, residual=residual), F.linear(x, weight) + residual)


def test_linear_leaves_everything_but_one_gpu_row_to_torch():
    weight, x = torch.randn(8, 16), torch.randn(3, 16)
    assert torch.equal(gemv.linear(x, weight), F.linear(x, weight))
    one = torch.randn(1, 1, 16)
    assert torch.equal(gemv.linear(one, weight), F.linear(one, weight))  # a CPU row


def test_rejects_more_than_one_row():
    with pytest.raises(ValueError, match="one row of 16 features"):
        gemv_triton.gemv_triton(torch.randn(2, 16), torch.randn(8, 16))
