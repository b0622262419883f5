"""The reference attention: float64 against SDPA and the log-sum-exp, exact merges, and keys past
each length ignored."""

import pytest
import torch
from kernel_checks import sdpa_same_dtype

from facli.kernels import merge_attention, reference
from facli.kernels.reference import attention_with_lse, decode_attention_reference


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("group", [1, 4], ids=["gqa1", "gqa4"])
def test_reference_matches_sdpa_float64(causal, group, monkeypatch):
    monkeypatch.setattr(reference, "SCORE_BUDGET", 4 * 8 * 70)  # force query blocks of ~4 rows
    q = torch.randn(2, 37, 8, 64, dtype=torch.float64)
    k = torch.randn(2, 70, 8 // group, 64, dtype=torch.float64)
    v = torch.randn_like(k)
    out, lse = attention_with_lse(q, k, v, causal=causal, q_offset=33)
    torch.testing.assert_close(out, sdpa_same_dtype(q, k, v, causal=causal, q_offset=33))
    kh = k.repeat_interleave(group, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, kh) / 8.0
    if causal:
        scores = scores.masked_fill(torch.ones(37, 70, dtype=torch.bool).triu(34), float("-inf"))
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1))


def test_merge_is_exact_and_ignores_empty_parts():
    q = torch.randn(1, 5, 4, 32, dtype=torch.float64)
    k, v = torch.randn(1, 40, 2, 32, dtype=torch.float64), torch.randn(1, 40, 2, 32, dtype=torch.float64)
    a = attention_with_lse(q, k[:, :15], v[:, :15], causal=False)
    b = attention_with_lse(q, k[:, 15:], v[:, 15:], causal=False)
    out, lse = merge_attention(*a, *b)
    full = attention_with_lse(q, k, v, causal=False)
    torch.testing.assert_close(out, full[0])
    torch.testing.assert_close(lse, full[1])
    empty = (torch.zeros_like(a[0]), torch.full_like(a[1], float("-inf")))
    torch.testing.assert_close(merge_attention(*a, *empty)[0], a[0])


def test_keys_past_each_length_are_ignored_even_when_unwritten():
    """Decode over a whole preallocated cache: positions past a sequence's length hold whatever
    the memory held, NaN included, and must not reach the output."""
    q = torch.randn(2, 1, 4, 16, dtype=torch.float64)
    k, v = torch.randn(2, 10, 2, 16, dtype=torch.float64), torch.randn(2, 10, 2, 16, dtype=torch.float64)
    lens = torch.tensor([3, 7])
    want = [decode_attention_reference(q[b:b + 1], k[b:b + 1, :n], v[b:b + 1, :n], lens[b:b + 1])
            for b, n in enumerate(lens.tolist())]
    for b, n in enumerate(lens.tolist()):
        k[b, n:], v[b, n:] = float("nan"), float("inf")
    got = decode_attention_reference(q, k, v, lens)
    assert torch.equal(got, torch.cat(want))
