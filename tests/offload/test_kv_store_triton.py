"""The offloaded store through the Triton kernels (interpreter lane): the views, lengths and
log-sum-exp calls it makes are ones the kernels accept, with the reference backend's results."""

import functools

import pytest
import torch
from conftest import HAS_CUDA
from kernel_checks import assert_within_torch_error
from kv_store_cases import _attention_over_stored_rows, _offloaded, _run, _steps

import facli.kernels as kernels
from facli.offload import kv_store

pytestmark = pytest.mark.skipif(HAS_CUDA, reason="interpreter lane; test_kv_store covers CUDA")


@pytest.mark.parametrize("host,mode,kv_dtype",
                         [((0, 2), "prefetch", "fp8"), ((1, 3), "cpu", None),
                          ((0, 1, 3), "split", None)],
                         ids=["prefetch-fp8", "cpu", "split"])
@pytest.mark.slow
def test_triton_kernels_match_reference(monkeypatch, host, mode, kv_dtype):
    steps = _steps(torch.float16)[:6]  # prefill chunks, a lone token, one decode step
    want = _run(_offloaded(host, mode, torch.float16, kv_dtype=kv_dtype, gpu_prefix_tokens=9),
                steps)
    for name in ("prefill_attention", "decode_attention"):
        forced = functools.partial(getattr(kernels, name), backend="triton")
        monkeypatch.setattr(kv_store, name, forced)
    got = _run(_offloaded(host, mode, torch.float16, kv_dtype=kv_dtype, gpu_prefix_tokens=9),
               steps)
    torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("host,mode", [((), "prefetch"), ((1, 3), "cpu")],
                         ids=["gpu-layers", "cpu-decode-over-gpu-prefix"])
def test_fp8_rows_read_by_the_kernels_match_float64(monkeypatch, host, mode):
    """Where the kernels read fp8 (here the interpreter, standing in for sm89+), a lone query reads
    GPU fp8 rows as stored, with their scales, in the decode kernel (decode steps and "cpu"
    decode's GPU prefix), while prefill chunks attend over dequantized tiles with the bf16 kernel,
    the faster of the two on an H100. Outputs against float64 attention over the stored rows,
    within twice the error of PyTorch's float16 attention over them."""
    monkeypatch.setattr(kv_store, "_reads_fp8", lambda device: True)
    calls = []
    for name in ("prefill_attention", "decode_attention"):
        def forced(*args, _kernel=getattr(kernels, name), _name=name, **kwargs):
            calls.append((_name, kwargs.get("k_scales") is not None))
            return _kernel(*args, backend="triton", **kwargs)
        monkeypatch.setattr(kv_store, name, forced)
    steps = _steps(torch.float16)[:6]  # prefill chunks of 7, 13, 1, 20, then two decode steps
    store = _offloaded(host, mode, torch.float16, kv_dtype="fp8", gpu_prefix_tokens=9)
    got = _run(store, steps)
    assert ("decode_attention", True) in calls and ("prefill_attention", False) in calls
    assert ("prefill_attention", True) not in calls
    want, same_dtype = _attention_over_stored_rows(store, steps)
    assert_within_torch_error(got, want, same_dtype)
