"""The offloaded store through the Triton kernels (interpreter lane): the views, lengths and
log-sum-exp calls it makes are ones the kernels accept, with the reference backend's results."""

import functools

import pytest
import torch
from conftest import HAS_CUDA
from kv_store_cases import _offloaded, _run, _steps

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
