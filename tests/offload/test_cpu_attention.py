"""CPU decode attention against the float64 reference attention."""

import pytest
import torch

from facli.kernels import attention_with_lse, merge_attention
from facli.offload.cpu_attention import cpu_decode_attention, cpu_suffix_attention
from facli.offload.fp8 import dequantize, quantize


def _case(batch, q_len, q_heads, kv_heads, head_dim, length, dtype=torch.float32):
    q = torch.randn(batch, q_len, q_heads, head_dim, dtype=dtype)
    k = torch.randn(batch, length + 5, kv_heads, head_dim, dtype=dtype)
    v = torch.randn(batch, length + 5, kv_heads, head_dim, dtype=dtype)
    return q, k, v


def _reference(q, k, v, length):
    out, lse = attention_with_lse(q.double(), k[:, :length].double(), v[:, :length].double(),
                                  causal=True, q_offset=length - q.shape[1])
    return out, lse


@pytest.mark.parametrize(
    "q_len,q_heads,kv_heads,head_dim,length",
    [(1, 4, 4, 64, 1), (1, 8, 2, 64, 63), (1, 8, 1, 128, 1000), (3, 8, 2, 64, 301)],
    ids=["T1-len1", "gqa4-len63", "gqa8-D128-len1000", "T3-len301"],
)
def test_matches_reference(q_len, q_heads, kv_heads, head_dim, length):
    q, k, v = _case(2, q_len, q_heads, kv_heads, head_dim, length)
    out, lse = cpu_decode_attention(q, k, v, length, key_tile=128)
    ref_out, ref_lse = _reference(q, k, v, length)
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-5)


def test_bf16_cache_within_twice_torch_error():
    q, k, v = _case(1, 1, 8, 2, 64, 777, dtype=torch.bfloat16)
    out, _ = cpu_decode_attention(q, k, v, 777, key_tile=100)
    exact, _ = _reference(q, k, v, 777)
    torch_bf16 = attention_with_lse(q, k[:, :777], v[:, :777], causal=True, q_offset=776)[0]
    ours = (out.double() - exact).abs().max()
    theirs = (torch_bf16.double() - exact).abs().max()
    assert ours <= 2 * theirs + 1e-6


def test_suffix_merges_with_prefix_to_full_attention():
    q, k, v = _case(2, 1, 8, 2, 64, 500)
    split = 123
    head, head_lse = attention_with_lse(q, k[:, :split], v[:, :split], causal=False)
    tail, tail_lse = cpu_suffix_attention(q, k[:, split:], v[:, split:], 500,
                                          first_position=split, key_tile=64)
    merged, _ = merge_attention(head, head_lse, tail, tail_lse)
    torch.testing.assert_close(merged.double(), _reference(q, k, v, 500)[0], rtol=1e-5, atol=1e-5)


def test_fp8_cache_equals_dequantized_cache():
    q, k, v = _case(1, 1, 8, 2, 64, 300)
    (k8, ks), (v8, vs) = quantize(k), quantize(v)
    out, lse = cpu_decode_attention(q, k8, v8, 300, k_scales=ks, v_scales=vs, key_tile=64)
    kd, vd = dequantize(k8, ks, torch.float32), dequantize(v8, vs, torch.float32)
    ref_out, ref_lse = _reference(q, kd, vd, 300)
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-5)


def test_no_visible_key_gives_zero_and_minus_inf():
    q, k, v = _case(1, 1, 4, 4, 64, 10)
    out, lse = cpu_suffix_attention(q, k, v, 10, first_position=10)
    assert torch.all(out == 0) and torch.all(lse == float("-inf"))
