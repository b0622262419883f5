"""The reference attention, and the helpers the kernel tests share: float64 oracle, same-dtype
PyTorch baseline, error bound, poisoned allocations."""

import pytest
import torch
import torch.nn.functional as F

from facli.kernels import common, merge_attention, reference
from facli.kernels.reference import attention_with_lse, decode_attention_reference


def poison_allocations(monkeypatch):
    """Every output and scratch buffer of the kernels starts NaN (ints: -1)."""

    def nan_empty(*shape, dtype, device):
        fill = float("nan") if dtype.is_floating_point else -1
        return torch.full(shape, fill, dtype=dtype, device=device)

    monkeypatch.setattr(common, "empty", nan_empty)


def rel_err(x, ref):
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


def oracle(q, k, v, *, causal, q_offset=0, key_lens=None, device="cpu"):
    """float64 attention and lse (on the CPU unless told), returned on the CPU."""
    f64 = lambda t: t.detach().to(device, torch.float64)  # noqa: E731
    if isinstance(q_offset, torch.Tensor):
        q_offset = q_offset.to(device)
    if key_lens is not None:
        key_lens = key_lens.to(device)
    out, lse = attention_with_lse(f64(q), f64(k), f64(v), causal=causal, q_offset=q_offset,
                                  key_lens=key_lens)
    return out.cpu(), lse.cpu()


def sdpa_same_dtype(q, k, v, *, causal, q_offset=0, key_lens=None):
    """PyTorch's scaled_dot_product_attention in the inputs' dtype, with an explicit mask."""
    batch, q_len, q_heads, _ = q.shape
    k_len, kv_heads = k.shape[1], k.shape[2]
    offsets = torch.as_tensor(q_offset, device=q.device).reshape(-1, 1, 1).expand(batch, 1, 1)
    key_pos = torch.arange(k_len, device=q.device).view(1, 1, -1)
    visible = torch.ones(batch, q_len, k_len, dtype=torch.bool, device=q.device)
    if causal:
        visible &= key_pos <= offsets + torch.arange(q_len, device=q.device).view(1, -1, 1)
    if key_lens is not None:
        visible &= key_pos < key_lens.view(-1, 1, 1)
    group = q_heads // kv_heads
    kh = k.transpose(1, 2).repeat_interleave(group, dim=1)
    vh = v.transpose(1, 2).repeat_interleave(group, dim=1)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), kh, vh, attn_mask=visible[:, None])
    return out.transpose(1, 2)


def assert_within_torch_error(out, ref, baseline):
    """DESIGN rule 4: the kernel's error is at most 2x that of PyTorch in the same dtype."""
    assert not torch.isnan(out).any(), "unwritten (NaN) output elements"
    err, torch_err = rel_err(out, ref), rel_err(baseline, ref)
    floor = torch.finfo(out.dtype).eps / 8  # below this both are at the dtype's rounding
    assert err <= max(2.0 * torch_err, floor), f"error {err:.3g} vs PyTorch's {torch_err:.3g}"


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
