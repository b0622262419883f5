"""The Gluon prefill kernel for Hopper against float64 and PyTorch's own attention (GPU only), its
fp8 variant against float64 and bit for bit against the 16-bit kernel over the dequantized cache,
and the model path's hand-over to the Triton kernel when it cannot start (any machine)."""

import pytest
import torch

from conftest import requires_cuda
from kernel_checks import GPU_CASES, case_id, check_fp8_prefill, check_prefill, fp8_cache

from facli.kernels import dequantize_fp8, prefill_attention, prefill_hopper, prefill_reads_fp8_at_speed
from facli.kernels.prefill import prefill_attention_triton
from facli.planner import policy

HOPPER_CASES = [case for case in GPU_CASES if case[5] in prefill_hopper.HEAD_DIMS] + [
    (1, 128, 0, 4, 4, 128, True, torch.bfloat16),  # one program, both warpgroups on the diagonal
    (1, 64, 64, 4, 2, 128, True, torch.bfloat16),  # the upper warpgroup has no queries
    (3, 1500, 37, 16, 4, 64, True, torch.float16),
    (2, 700, 900, 8, 2, 128, False, torch.bfloat16),
    (1, 5000, 0, 8, 8, 128, False, torch.float16),
]


def requires_hopper(fn):
    on_hopper = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
    releases = ", ".join(f"{release}x" for release in prefill_hopper.TESTED_TRITON)
    reason = f"needs an sm90 GPU and Triton {releases} (Gluon's Hopper ops)"
    return pytest.mark.skipif(not (on_hopper and prefill_hopper.GLUON), reason=reason)(fn)


@requires_cuda
@requires_hopper
@pytest.mark.parametrize("case", HOPPER_CASES, ids=case_id)
def test_hopper_prefill(case, monkeypatch):
    check_prefill(case, monkeypatch, "cuda", attention=prefill_hopper.prefill_attention_hopper)


@requires_cuda
@requires_hopper
@pytest.mark.parametrize("case", HOPPER_CASES, ids=case_id)
def test_hopper_prefill_over_fp8(case, monkeypatch):
    check_fp8_prefill(case, monkeypatch, "cuda", attention=prefill_hopper.prefill_attention_hopper)


@requires_cuda
@requires_hopper
@pytest.mark.parametrize("causal, offset", [(True, 3000), (False, 0)])
def test_hopper_fp8_equals_the_16_bit_kernel_over_the_dequantized_cache(causal, offset):
    """Its producer writes the values dequantize_fp8 makes, so the consumers compute the same bits;
    scales head-major, as the store's GPU rows hold them, and cache slices."""
    torch.manual_seed(0)
    batch, q_len, q_heads, kv_heads, d = 2, 1100, 16, 4, 128
    q = torch.randn(batch, q_len, q_heads, d, device="cuda", dtype=torch.bfloat16)
    k8, ks = fp8_cache(batch, offset + q_len + 50, kv_heads, d, "cuda")
    v8, vs = fp8_cache(batch, offset + q_len + 50, kv_heads, d, "cuda")
    ks, vs = (s.transpose(1, 2).contiguous().transpose(1, 2) for s in (ks, vs))
    k8, v8, ks, vs = (t[:, :offset + q_len] for t in (k8, v8, ks, vs))
    kwargs = {"causal": causal, "q_offset": offset, "return_lse": True}
    out, lse = prefill_hopper.prefill_attention_hopper(q, k8, v8, k_scales=ks, v_scales=vs, **kwargs)
    k16, v16 = dequantize_fp8(k8, ks, q.dtype), dequantize_fp8(v8, vs, q.dtype)
    ref, ref_lse = prefill_hopper.prefill_attention_hopper(q, k16, v16, **kwargs)
    assert torch.equal(out, ref)
    assert torch.equal(lse, ref_lse)


@requires_cuda
@requires_hopper
def test_long_fp8_chunks_go_to_the_hopper_kernel_where_the_run_rules_let_them(monkeypatch):
    k8, ks = fp8_cache(1, 600, 2, 128, "cuda")
    q = torch.randn(1, 600, 8, 128, device="cuda", dtype=torch.bfloat16)
    monkeypatch.setattr(policy, "HOPPER_PREFILL_READS_FP8", False)
    assert not prefill_reads_fp8_at_speed(q) and not prefill_hopper.supports(q, k8, k8)
    monkeypatch.setattr(policy, "HOPPER_PREFILL_READS_FP8", True)
    calls = []
    kernel = prefill_hopper.prefill_attention_hopper
    monkeypatch.setattr(prefill_hopper, "prefill_attention_hopper",
                        lambda *args, **kwargs: calls.append(args[1].dtype) or kernel(*args, **kwargs))
    assert prefill_reads_fp8_at_speed(q) and not prefill_reads_fp8_at_speed(q[:, :64])
    prefill_attention(q, k8, k8, k_scales=ks, v_scales=ks)
    assert calls == [torch.float8_e4m3fn]


@requires_cuda
@requires_hopper
def test_hopper_prefill_takes_cache_slices():
    batch, q_len, heads, d = 2, 300, 4, 128
    q = torch.randn(batch, q_len, heads, d, device="cuda", dtype=torch.bfloat16)
    cache = torch.randn(2, batch, 1000, heads, d, device="cuda", dtype=torch.bfloat16)
    assert prefill_hopper.supports(q, cache[0, :, :q_len], cache[1, :, :q_len])
    assert not prefill_hopper.supports(q.float(), cache[0, :, :q_len], cache[1, :, :q_len])
    assert not prefill_hopper.supports(q[..., :64], cache[0, :, :q_len, :, :64], cache[1, :, :q_len, :, :64])


@requires_cuda
@requires_hopper
def test_model_path_runs_the_hopper_kernel_for_long_chunks(monkeypatch):
    calls = []
    kernel = prefill_hopper.prefill_attention_hopper
    monkeypatch.setattr(prefill_hopper, "prefill_attention_hopper",
                        lambda *args, **kwargs: calls.append(args[0].shape[1]) or kernel(*args, **kwargs))
    k = torch.randn(1, 600, 2, 128, device="cuda", dtype=torch.bfloat16)
    for q_len in (64, 65, 600):
        q = torch.randn(1, q_len, 8, 128, device="cuda", dtype=torch.bfloat16)
        prefill_attention(q, k[:, :q_len], k[:, :q_len])
    assert calls == [65, 600]  # 64 queries and fewer take the small-block Triton kernel


def _fake_hopper(monkeypatch, behaviour):
    """The model's path with a stand-in Hopper kernel, on any machine: calls are counted."""
    calls = []

    def hopper(*args, **kwargs):
        calls.append(args[0].shape[1])
        return behaviour(len(calls), *args, **kwargs)

    monkeypatch.setattr(prefill_hopper, "prefill_attention_hopper", hopper)
    monkeypatch.setattr(prefill_hopper, "supports",
                        lambda q, k, v: prefill_hopper._launch[False]["failed"] is None)
    monkeypatch.setitem(prefill_hopper._launch, False, {"checked": False, "failed": None})
    return calls


def _inputs(q_len=70):
    """On the GPU where there is one; else the interpreter runs the Triton kernel."""
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q = torch.randn(1, q_len, 4, 64, dtype=torch.float16, device=device)
    k = torch.randn(1, q_len, 2, 64, dtype=torch.float16, device=device)
    v = torch.randn(1, q_len, 2, 64, dtype=torch.float16, device=device)
    return q, k, v


def test_a_hopper_kernel_that_cannot_start_hands_over_to_the_triton_kernel(monkeypatch):
    def broken(n, *args, **kwargs):
        raise RuntimeError("PassManager::run failed")

    calls = _fake_hopper(monkeypatch, broken)
    q, k, v = _inputs()
    with pytest.warns(RuntimeWarning, match="did not start.*PassManager"):
        out = prefill_attention(q, k, v, backend="triton")
    again = prefill_attention(q, k, v, backend="triton")
    expected = prefill_attention_triton(q, k, v)
    assert calls == [70]  # tried once, then never again in this process
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    torch.testing.assert_close(again, expected, atol=0, rtol=0)


def test_hopper_failures_after_a_working_launch_and_bad_inputs_still_raise(monkeypatch):
    def works_once(n, q, k, v, **kwargs):
        if n > 1:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return prefill_attention_triton(q, k, v, **kwargs)

    _fake_hopper(monkeypatch, works_once)
    q, k, v = _inputs()
    prefill_attention(q, k, v, backend="triton")
    with pytest.raises(RuntimeError, match="illegal memory access"):
        prefill_attention(q, k, v, backend="triton")

    def rejects(n, *args, **kwargs):
        raise ValueError("expected q_offset a non-negative int, got -1")

    _fake_hopper(monkeypatch, rejects)
    with pytest.raises(ValueError, match="non-negative"):
        prefill_attention(q, k, v, q_offset=-1, backend="triton")
