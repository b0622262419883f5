import pytest
import torch

from conftest import requires_cuda
from kernel_checks import (GPU_CASES, assert_within_torch_error, case_id, check_prefill, oracle,
                           poison_allocations, sdpa_same_dtype)

from facli.kernels import merge_attention, prefill_attention
from facli.kernels.configs import PrefillConfig

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (batch, q_len, q_offset, q_heads, kv_heads, head_dim, causal, dtype)
CPU_CASES = [
    (1, 1, 0, 4, 4, 64, True, torch.float16),
    (1, 63, 0, 4, 1, 64, True, torch.float16),
    (2, 257, 0, 8, 1, 64, True, torch.float16),
    (1, 63, 100, 8, 2, 128, True, torch.float16),
    (1, 1, 199, 4, 1, 128, True, torch.float16),
    (2, 63, 194, 4, 4, 64, False, torch.float16),
    (1, 257, 0, 8, 8, 64, False, torch.float32),
    (1, 33, 40, 4, 2, 80, True, torch.float16),
    (1, 40, 0, 2, 1, 96, True, torch.float32),
    (1, 17, 5, 2, 2, 256, True, torch.float32),
    (1, 63, 1, 4, 1, 64, True, torch.bfloat16),
]


@pytest.mark.parametrize("case", CPU_CASES, ids=case_id)
@pytest.mark.slow
def test_prefill_matches_float64_and_sdpa(case, monkeypatch):
    check_prefill(case, monkeypatch, DEVICE)


@requires_cuda
@pytest.mark.parametrize("case", GPU_CASES, ids=case_id)
def test_prefill_gpu(case, monkeypatch):
    check_prefill(case, monkeypatch, "cuda")


@requires_cuda
@pytest.mark.parametrize("case", [GPU_CASES[0], GPU_CASES[2], GPU_CASES[5]], ids=case_id)
def test_prefill_gpu_pointer_tiles(case, monkeypatch):
    """The pre-Hopper path (plain loads) on the GPU; the Hopper table uses the copy engine."""
    check_prefill(case, monkeypatch, "cuda", PrefillConfig(128, 64, 8, 2))


def test_lse_merges_split_keys(monkeypatch):
    poison_allocations(monkeypatch)
    q = torch.randn(1, 20, 4, 64, device=DEVICE, dtype=torch.float16)
    k = torch.randn(1, 90, 2, 64, device=DEVICE, dtype=torch.float16)
    v = torch.randn_like(k)
    a = prefill_attention(q, k[:, :50], v[:, :50], causal=False, return_lse=True, backend="triton")
    b = prefill_attention(q, k[:, 50:], v[:, 50:], causal=False, return_lse=True, backend="triton")
    out, _ = merge_attention(a[0].float(), a[1], b[0].float(), b[1])
    ref, _ = oracle(q, k, v, causal=False)
    torch.testing.assert_close(out.cpu().double(), ref, atol=2e-3, rtol=2e-3)


def test_auto_backend_on_cpu_is_the_reference():
    q = torch.randn(1, 5, 2, 64, dtype=torch.float64)
    k, v = torch.randn(1, 5, 1, 64, dtype=torch.float64), torch.randn(1, 5, 1, 64, dtype=torch.float64)
    out = prefill_attention(q, k, v)
    torch.testing.assert_close(out, oracle(q, k, v, causal=True)[0])


def test_rejects_mismatched_heads():
    q = torch.randn(1, 4, 3, 64, dtype=torch.float16)
    k = torch.randn(1, 4, 2, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match="multiple of Hkv"):
        prefill_attention(q, k, k, backend="triton")


@requires_cuda
@pytest.mark.slow
def test_prefill_256k_keys_int64_offsets():
    """A chunk at the end of a 256K prompt, with batch strides past 2**31 elements."""
    k_len, heads, d = 256 * 1024 + 37, 8, 128
    big = torch.empty((1 << 31) // (heads * d) + k_len + 8, heads, d, device="cuda",
                      dtype=torch.bfloat16).normal_()
    stride_b = (1 << 31) + heads * d * 5  # batch 1 starts past 2**31 elements
    k = big.as_strided((2, k_len, heads, d), (stride_b, heads * d, d, 1))
    v = big.as_strided((2, k_len, heads, d), (stride_b, heads * d, d, 1), storage_offset=heads * d)
    q = torch.randn(2, 200, 32, d, device="cuda", dtype=torch.bfloat16)
    out = prefill_attention(q, k, v, q_offset=k_len - 200)
    for b in range(2):
        ref, _ = oracle(q[b:b + 1], k[b:b + 1], v[b:b + 1], causal=True, q_offset=k_len - 200,
                        device="cuda")
        base = sdpa_same_dtype(q[b:b + 1], k[b:b + 1], v[b:b + 1], causal=True,
                               q_offset=k_len - 200)
        assert_within_torch_error(out[b:b + 1].cpu(), ref, base.cpu())
