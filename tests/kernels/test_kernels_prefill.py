import pytest
import torch

from conftest import requires_cuda
from kernel_checks import (GPU_CASES, assert_within_torch_error, case_id, check_fp8_prefill,
                           check_prefill, dequantized64, fp8_cache, oracle, poison_allocations,
                           sdpa_same_dtype)

from facli.kernels import common, merge_attention, prefill_attention
from facli.kernels import prefill as prefill_module
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


# fp8 K/V with per-token-per-head scales, read by the kernel itself (interpreter lane).
# (batch, q_len, q_offset, q_heads, kv_heads, head_dim, causal, dtype)
FP8_CPU_CASES = [
    (1, 63, 0, 4, 1, 64, True, torch.float16),
    (2, 45, 100, 8, 2, 128, True, torch.float16),
    (1, 37, 0, 4, 4, 64, False, torch.float32),
    (2, 20, 29, 4, 2, 64, False, torch.float16),
    (1, 33, 40, 4, 2, 80, True, torch.float16),
    (1, 1, 70, 8, 1, 64, True, torch.float32),
    (1, 40, 3, 2, 1, 256, True, torch.float32),
    (1, 63, 1, 4, 1, 64, True, torch.bfloat16),
]

# The prefill cases of GPU_CASES, and the 4K one in bf16 too.
FP8_GPU_CASES = ([case for case in GPU_CASES if case[1] > 1]
                 + [(1, 4096, 0, 8, 8, 128, True, torch.bfloat16)])


def test_fp8_prefill_fast_case(monkeypatch):
    """One small case of the fp8 path in the fast lane; FP8_CPU_CASES below cover the grid."""
    check_fp8_prefill((1, 19, 13, 4, 2, 64, True, torch.float16), monkeypatch, DEVICE)


@pytest.mark.parametrize("case", FP8_CPU_CASES, ids=case_id)
@pytest.mark.slow
def test_fp8_prefill_matches_float64(case, monkeypatch):
    check_fp8_prefill(case, monkeypatch, DEVICE)


@pytest.mark.parametrize("case", [FP8_CPU_CASES[1], FP8_CPU_CASES[3]], ids=case_id)
@pytest.mark.slow
def test_fp8_prefill_reads_scales_stored_by_head(case, monkeypatch):
    check_fp8_prefill(case, monkeypatch, DEVICE, head_major_scales=True)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_fp8_public_entry_point(monkeypatch, backend):
    """prefill_attention with k_scales/v_scales: the kernel (interpreter lane) or the reference
    over the dequantized cache, both against float64."""
    check_fp8_prefill((2, 21, 30, 4, 1, 64, True, torch.float32), monkeypatch, DEVICE,
                      attention=lambda *a, **kw: prefill_attention(*a, backend=backend, **kw))


def test_fp8_on_gpus_that_cannot_read_e4m3_dequantizes_first(monkeypatch):
    """Where the kernels cannot convert e4m3 (before sm89) the 16-bit kernel gets a dequantized
    copy, with the same results."""
    calls = []
    kernel = prefill_module.prefill_attention_triton

    def spy(q, k, v, **kwargs):
        calls.append((k.dtype, kwargs.get("k_scales")))
        return kernel(q, k, v, **kwargs)

    monkeypatch.setattr(common, "reads_e4m3", lambda device: False)
    monkeypatch.setattr(prefill_module, "prefill_attention_triton", spy)
    check_fp8_prefill((1, 30, 7, 4, 2, 64, True, torch.float16), monkeypatch, DEVICE,
                      attention=lambda *a, **kw: prefill_attention(*a, backend="triton", **kw))
    assert calls == [(torch.float16, None)]


def test_fp8_prefill_rejects_half_given_scales():
    k8, ks = fp8_cache(1, 8, 1, 64, DEVICE)
    q = torch.zeros(1, 8, 1, 64, device=DEVICE)
    with pytest.raises(ValueError, match="both k_scales and v_scales"):
        prefill_attention(q, k8, k8, k_scales=ks, backend="triton")


@requires_cuda
@pytest.mark.parametrize("config", [None, PrefillConfig(128, 64, 8, 2)],
                         ids=["table", "pointer-tiles"])
@pytest.mark.parametrize("case", FP8_GPU_CASES, ids=case_id)
def test_fp8_prefill_gpu(case, config, monkeypatch):
    """The table's config (on Hopper through the copy engine) and plain loads."""
    if not common.reads_e4m3(torch.device("cuda")):
        pytest.skip("the kernels read e4m3 from compute capability 8.9")
    check_fp8_prefill(case, monkeypatch, "cuda", config=config, head_major_scales=True)


@requires_cuda
@pytest.mark.slow
def test_fp8_prefill_public_gpu_matches_bf16_kernel_on_dequantized_cache(monkeypatch):
    """A long causal chunk over an fp8 prefix through the public entry point: within the error of
    the 16-bit path (the model's kernel) over the cache dequantized to bf16."""
    if not common.reads_e4m3(torch.device("cuda")):
        pytest.skip("the kernels read e4m3 from compute capability 8.9")
    k8, ks = fp8_cache(1, 20000, 8, 128, "cuda")
    v8, vs = fp8_cache(1, 20000, 8, 128, "cuda")
    q = torch.randn(1, 4000, 32, 128, device="cuda", dtype=torch.bfloat16)
    out = prefill_attention(q, k8, v8, q_offset=16000, k_scales=ks, v_scales=vs)
    k64, v64 = dequantized64(k8, ks), dequantized64(v8, vs)
    ref, _ = oracle(q, k64, v64, causal=True, q_offset=16000, device="cuda")
    base = prefill_attention(q, k64.bfloat16(), v64.bfloat16(), q_offset=16000)
    assert_within_torch_error(out.cpu(), ref, base.cpu())
