"""The Gluon prefill kernel for Hopper against float64 and PyTorch's own attention (GPU only)."""

import pytest
import torch

from conftest import requires_cuda
from test_kernels_prefill import GPU_CASES, case_id, check_prefill

from facli.kernels import prefill_attention, prefill_hopper

HOPPER_CASES = [case for case in GPU_CASES if case[5] in prefill_hopper.HEAD_DIMS] + [
    (1, 128, 0, 4, 4, 128, True, torch.bfloat16),  # one program, both warpgroups on the diagonal
    (1, 64, 64, 4, 2, 128, True, torch.bfloat16),  # the upper warpgroup has no queries
    (3, 1500, 37, 16, 4, 64, True, torch.float16),
    (2, 700, 900, 8, 2, 128, False, torch.bfloat16),
    (1, 5000, 0, 8, 8, 128, False, torch.float16),
]


def requires_hopper(fn):
    on_hopper = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
    reason = f"needs an sm90 GPU and Triton {prefill_hopper.TESTED_TRITON} (Gluon's Hopper ops)"
    return pytest.mark.skipif(not (on_hopper and prefill_hopper.GLUON), reason=reason)(fn)


@requires_cuda
@requires_hopper
@pytest.mark.parametrize("case", HOPPER_CASES, ids=case_id)
def test_hopper_prefill(case, monkeypatch):
    check_prefill(case, monkeypatch, "cuda", attention=prefill_hopper.prefill_attention_hopper)


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
