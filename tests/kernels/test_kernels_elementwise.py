"""Fused RMSNorm, rotary embeddings, SiLU * up and the two-rank partial sum against Hugging
Face's Llama code and PyTorch's own ops."""

import pytest
import torch
from transformers.activations import ACT2FN
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

from conftest import requires_cuda
from kernel_checks import poison_allocations

from facli.kernels import elementwise, elementwise_triton

CPU_DTYPES = [torch.float32, torch.float16]  # the interpreter's bf16 arithmetic is wrong
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU tensors need the interpreter


def within_two_roundings(out, ref):
    """Equal up to two roundings of a 16-bit output (the intermediate PyTorch rounds, computed
    with another RMS sum order or exponential, may round the other way, then the output), or a
    few float32 ones."""
    assert not torch.isnan(out).any(), "unwritten (NaN) output elements"
    ulp = torch.finfo(ref.dtype).eps * (8 if ref.dtype == torch.float32 else 2)
    torch.testing.assert_close(out.double(), ref.double(), rtol=ulp, atol=ulp * 1e-3)


def check_rms_norm(device, dtype, rows, cols, monkeypatch):
    poison_allocations(monkeypatch)
    x = torch.randn(rows, cols, device=device).to(dtype) * 3
    residual = torch.randn(rows, cols, device=device).to(dtype)
    hf = LlamaRMSNorm(cols, eps=1e-5).to(device=device, dtype=dtype)
    hf.weight.data = torch.randn(cols, device=device).to(dtype)
    with torch.no_grad():
        within_two_roundings(elementwise_triton.rms_norm_triton(x, hf.weight, 1e-5), hf(x))
        normed, summed = elementwise_triton.rms_norm_triton(x, hf.weight, 1e-5, residual)
        assert torch.equal(summed, x + residual)
        within_two_roundings(normed, hf(x + residual))


def check_rotary(device, dtype, batch, seq, heads, dim, monkeypatch, per_sequence=False):
    """per_sequence: cos, sin [B, T, D], each sequence at its own positions; else [T, D]."""
    poison_allocations(monkeypatch)
    # q as the model makes it: a [B, T, H, D] view of a projection's [B, T, H * D] output.
    x = torch.randn(batch, seq, heads * dim, device=device).to(dtype).view(batch, seq, heads, dim)
    angles = torch.randn(*((batch,) if per_sequence else ()), seq, dim // 2, device=device) * 4
    cos, sin = torch.cat((angles, angles), -1).cos().to(dtype), torch.cat((angles, angles), -1).sin().to(dtype)
    hf_cos, hf_sin = (cos, sin) if per_sequence else (cos[None], sin[None])
    ref, _ = apply_rotary_pos_emb(x.transpose(1, 2), x.transpose(1, 2), hf_cos, hf_sin)
    out = elementwise_triton.apply_rotary_triton(x, cos, sin)
    assert torch.equal(out, ref.transpose(1, 2)), (out - ref.transpose(1, 2)).abs().max()
    if device == "cpu":
        assert torch.equal(elementwise.apply_rotary_reference(x, cos, sin), ref.transpose(1, 2))


def check_silu_mul(device, dtype, shape, monkeypatch):
    poison_allocations(monkeypatch)
    gate, up = (torch.randn(shape, device=device).to(dtype) * 4 for _ in range(2))
    within_two_roundings(elementwise_triton.silu_mul_triton(gate, up), ACT2FN["silu"](gate) * up)
    # As the MLP passes them: the two halves of one [..., 2 * I] gate/up projection output.
    gate, up = torch.cat((gate, up), -1).split(shape[-1], -1)
    within_two_roundings(elementwise_triton.silu_mul_triton(gate, up), ACT2FN["silu"](gate) * up)


def check_pair_sum(device, dtype, rows, cols, monkeypatch, impl=elementwise.pair_sum):
    poison_allocations(monkeypatch)
    first, second, residual = (torch.randn(rows, cols, device=device).to(dtype) * 3 for _ in range(3))
    hf = LlamaRMSNorm(cols, eps=1e-5).to(device=device, dtype=dtype)
    hf.weight.data = torch.randn(cols, device=device).to(dtype)
    # As all_reduce and the layer round: the partials' sum, then the residual add.
    summed = first + second
    assert torch.equal(impl(first, second), summed)
    assert torch.equal(impl(first, second, residual=residual), summed + residual)
    out = torch.full_like(first, float("nan"))
    with torch.no_grad():
        normed, h = impl(first, second, residual=residual, norm_weight=hf.weight, eps=1e-5, out=out)
        assert h is out and torch.equal(h, summed + residual)
        within_two_roundings(normed, hf(summed + residual))
    # In place, as a rank sums into its own partial.
    own = first.clone()
    impl(own, second, out=own)
    assert torch.equal(own, summed)


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("rows,cols", [(1, 64), (7, 80), (33, 256)])
def test_pair_sum(dtype, rows, cols, monkeypatch):
    check_pair_sum(DEVICE, dtype, rows, cols, monkeypatch)
    check_pair_sum("cpu", dtype, rows, cols, monkeypatch, impl=elementwise.pair_sum_reference)


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("rows,cols", [(1, 64), (7, 80), (33, 256)])
def test_rms_norm(dtype, rows, cols, monkeypatch):
    check_rms_norm(DEVICE, dtype, rows, cols, monkeypatch)


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("batch,seq,heads,dim", [(1, 1, 4, 64), (2, 9, 5, 80), (1, 17, 8, 128)])
def test_rotary(dtype, batch, seq, heads, dim, monkeypatch):
    check_rotary(DEVICE, dtype, batch, seq, heads, dim, monkeypatch)


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("batch,seq", [(1, 1), (5, 1), (3, 4)])
def test_rotary_at_positions_per_sequence(dtype, batch, seq, monkeypatch):
    check_rotary(DEVICE, dtype, batch, seq, 4, 64, monkeypatch, per_sequence=True)


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (3, 700), (5, 4097), (2, 3, 300)])
def test_silu_mul(dtype, shape, monkeypatch):
    check_silu_mul(DEVICE, dtype, shape, monkeypatch)


def test_cpu_tensors_take_the_reference():
    x, w = torch.randn(3, 16), torch.randn(16)
    assert torch.equal(elementwise.rms_norm(x, w, 1e-6), elementwise.rms_norm_reference(x, w, 1e-6))


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_elementwise_gpu(dtype, monkeypatch):
    check_rms_norm("cuda", dtype, 4099, 4096, monkeypatch)
    check_rms_norm("cuda", dtype, 3, 5120, monkeypatch)
    check_rotary("cuda", dtype, 2, 1000, 32, 128, monkeypatch)
    check_rotary("cuda", dtype, 1, 7, 5, 80, monkeypatch)
    check_rotary("cuda", dtype, 48, 1, 32, 128, monkeypatch, per_sequence=True)
    check_silu_mul("cuda", dtype, (4099, 5504), monkeypatch)
    check_pair_sum("cuda", dtype, 4099, 4096, monkeypatch)
