"""What the kernel tests share: the float64 oracle, PyTorch's same-dtype baseline, the error bound
between them, poisoned allocations, fp8 caches, and the prefill checks with their GPU cases."""

import torch
import torch.nn.functional as F

from facli.kernels import common
from facli.kernels.prefill import prefill_attention_triton
from facli.kernels.reference import attention_with_lse


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
    """The kernel's error is at most 2x that of PyTorch computing the same thing in the same dtype."""
    assert not torch.isnan(out).any(), "unwritten (NaN) output elements"
    err, torch_err = rel_err(out, ref), rel_err(baseline, ref)
    floor = torch.finfo(out.dtype).eps / 8  # below this both are at the dtype's rounding
    assert err <= max(2.0 * torch_err, floor), f"error {err:.3g} vs PyTorch's {torch_err:.3g}"


# (batch, q_len, q_offset, q_heads, kv_heads, head_dim, causal, dtype)
GPU_CASES = [
    (2, 1000, 2000, 32, 8, 128, True, torch.bfloat16),
    (1, 4096, 0, 8, 8, 128, True, torch.float16),
    (1, 777, 3, 8, 1, 64, True, torch.bfloat16),
    (1, 513, 1000, 8, 2, 80, True, torch.bfloat16),
    (1, 300, 0, 4, 4, 96, False, torch.bfloat16),
    (1, 1029, 0, 4, 1, 256, True, torch.bfloat16),
    (2, 1, 4000, 32, 4, 128, True, torch.bfloat16),
]


def case_id(case):
    batch, q_len, offset, hq, hkv, d, causal, dtype = case
    kind = "causal" if causal else "full"
    return f"B{batch}-T{q_len}-off{offset}-gqa{hq // hkv}-d{d}-{kind}-{str(dtype)[6:]}"


def prefill_queries(case, device):
    """(dtype, k_len, q) of a prefill case: q [B, Tq, Hq, D] random in the case's dtype, which on
    a GPU is float16 where the CPU lane's is float32."""
    batch, q_len, offset, q_heads, _, head_dim, _, dtype = case
    if device == "cuda" and dtype == torch.float32:
        dtype = torch.float16
    q = torch.randn(batch, q_len, q_heads, head_dim, device=device).to(dtype)
    return dtype, offset + q_len, q


def check_prefill(case, monkeypatch, device, config=None, attention=prefill_attention_triton):
    poison_allocations(monkeypatch)
    batch, q_len, offset, q_heads, kv_heads, head_dim, causal, _ = case
    dtype, k_len, q = prefill_queries(case, device)
    # K/V as the model passes them: a prefix slice of one layer of a [L, B, cap, H, D] cache.
    cache = torch.randn(2, 2, batch, k_len + 9, kv_heads, head_dim, device=device).to(dtype)
    k, v = cache[0, 1, :, :k_len], cache[1, 1, :, :k_len]
    kwargs = {} if config is None else {"config": config}
    out, lse = attention(q, k, v, causal=causal, q_offset=offset, return_lse=True, **kwargs)
    ref, ref_lse = oracle(q, k, v, causal=causal, q_offset=offset)
    base_dtype = torch.float32 if dtype == torch.bfloat16 and device == "cpu" else dtype
    base = sdpa_same_dtype(q.to(base_dtype), k.to(base_dtype), v.to(base_dtype), causal=causal,
                           q_offset=offset).to(dtype)
    assert out.shape == q.shape and out.dtype == dtype
    assert_within_torch_error(out.cpu(), ref, base.cpu())
    torch.testing.assert_close(lse.cpu().double(), ref_lse, atol=1e-4, rtol=1e-5)


def fp8_cache(batch, cache_len, kv_heads, head_dim, device):
    """e4m3 values over the whole code range (negatives, subnormals, zeros, up to 448) and
    float32 scales per token and head, as an fp8 KV store holds them."""
    values = torch.randn(batch, cache_len, kv_heads, head_dim, device=device) * 60
    values[..., :4] *= 1e-4  # e4m3 subnormals and zeros
    values = values.clamp(-448, 448).to(torch.float8_e4m3fn)
    scales = torch.rand(batch, cache_len, kv_heads, device=device) * 0.01 + 0.001
    return values, scales


def dequantized64(values, scales):
    """An fp8 cache's values exactly, in float64 (e4m3 times a float32 scale fits its mantissa)."""
    return values.double() * scales.double().unsqueeze(-1)


def check_fp8_prefill(case, monkeypatch, device, *, config=None, head_major_scales=False,
                      attention=prefill_attention_triton):
    """Prefill over e4m3 K/V with per-token-per-head scales (strided views of a larger cache, as
    the KV store passes them) against float64 attention over the dequantized cache, within twice
    the error of PyTorch's attention over that cache in q's dtype; lse against float64's.
    head_major_scales: scales [B, Tk, Hkv] stored [B, Hkv, Tk], as the store's GPU rows hold
    them."""
    poison_allocations(monkeypatch)
    batch, q_len, offset, q_heads, kv_heads, head_dim, causal, _ = case
    dtype, k_len, q = prefill_queries(case, device)
    k8, ks = fp8_cache(batch, k_len + 9, kv_heads, head_dim, device)
    v8, vs = fp8_cache(batch, k_len + 9, kv_heads, head_dim, device)
    if head_major_scales:
        ks, vs = (s.transpose(1, 2).contiguous().transpose(1, 2) for s in (ks, vs))
    k8, v8, ks, vs = (t[:, :k_len] for t in (k8, v8, ks, vs))
    kwargs = {} if config is None else {"config": config}
    out, lse = attention(q, k8, v8, causal=causal, q_offset=offset, return_lse=True,
                         k_scales=ks, v_scales=vs, **kwargs)
    k64, v64 = dequantized64(k8, ks), dequantized64(v8, vs)
    ref, ref_lse = oracle(q, k64, v64, causal=causal, q_offset=offset)
    base_dtype = torch.float32 if dtype == torch.bfloat16 and device == "cpu" else dtype
    base = sdpa_same_dtype(q.to(base_dtype), k64.to(base_dtype), v64.to(base_dtype),
                           causal=causal, q_offset=offset).to(dtype)
    assert out.shape == q.shape and out.dtype == dtype
    assert_within_torch_error(out.cpu(), ref, base.cpu())
    torch.testing.assert_close(lse.cpu().double(), ref_lse, atol=1e-4, rtol=1e-5)
