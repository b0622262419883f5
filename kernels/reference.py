"""Plain-PyTorch attention: the oracle for the Triton kernels and the CPU path.

Tiled over query blocks so that no [Tq, Tk] matrix larger than one block is ever held: the block
shrinks as Tk grows so that one block's scores stay under SCORE_BUDGET elements, and it runs at
256K keys. Computes in float32 (float64 inputs stay float64).
"""

import math

import torch

QUERY_BLOCK = 512
SCORE_BUDGET = 1 << 28  # elements of one block's [B, H, block, Tk] scores (1 GiB in float32)


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def attention_with_lse(q, k, v, *, causal=True, q_offset=0, scale=None, key_lens=None):
    """Attention and its log-sum-exp.

    q [B, Tq, Hq, D]; k, v [B, Tk, Hkv, D] with Hq a multiple of Hkv. Query i sits at absolute
    position q_offset + i (q_offset: int or a [B] tensor) and, when causal, sees keys at
    positions <= its own. key_lens [B] (optional) hides keys at positions >= key_lens[b].
    Returns out [B, Tq, Hq, D] in q's dtype and lse [B, Hq, Tq] in float32/float64 (natural log;
    -inf for a query that sees no key, whose output is 0).
    """
    batch, q_len, q_heads, head_dim = q.shape
    k_len, kv_heads = k.shape[1], k.shape[2]
    assert q_heads % kv_heads == 0, "Hq must be a multiple of Hkv"
    group = q_heads // kv_heads
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    acc = _accumulation_dtype(q.dtype)
    # [B, Hkv, group, T, D]: GQA without repeating K/V.
    qh = q.to(acc).permute(0, 2, 1, 3).reshape(batch, kv_heads, group, q_len, head_dim)
    kh = k.to(acc).permute(0, 2, 1, 3).unsqueeze(2)
    vh = v.to(acc).permute(0, 2, 1, 3).unsqueeze(2)
    offsets = torch.as_tensor(q_offset, device=q.device).reshape(-1, 1, 1).expand(batch, 1, 1)
    key_pos = torch.arange(k_len, device=q.device)
    if key_lens is not None:  # hidden rows may be unwritten memory: NaN * 0 would still be NaN
        hidden = key_pos.view(1, -1) >= key_lens.to(q.device).view(-1, 1)
        if hidden.any():
            vh = vh.masked_fill(hidden[:, None, None, :, None], 0.0)
    out = torch.empty(batch, kv_heads, group, q_len, head_dim, dtype=acc, device=q.device)
    lse = torch.empty(batch, kv_heads, group, q_len, dtype=acc, device=q.device)
    block = max(1, min(QUERY_BLOCK, SCORE_BUDGET // max(1, batch * q_heads * k_len)))
    for start in range(0, q_len, block):
        stop = min(start + block, q_len)
        scores = torch.matmul(qh[:, :, :, start:stop], kh.transpose(-1, -2)) * scale
        visible = torch.ones(batch, stop - start, k_len, dtype=torch.bool, device=q.device)
        if causal:
            query_pos = offsets + torch.arange(start, stop, device=q.device).view(1, -1, 1)
            visible &= key_pos.view(1, 1, -1) <= query_pos
        if key_lens is not None:
            visible &= key_pos.view(1, 1, -1) < key_lens.to(q.device).view(-1, 1, 1)
        scores = scores.masked_fill(~visible[:, None, None], float("-inf"))
        block_lse = torch.logsumexp(scores, dim=-1)
        probs = torch.exp(scores - block_lse.unsqueeze(-1).clamp_min(torch.finfo(acc).min))
        probs = torch.nan_to_num(probs, nan=0.0)
        out[:, :, :, start:stop] = torch.matmul(probs, vh)
        lse[:, :, :, start:stop] = block_lse
    out = out.reshape(batch, q_heads, q_len, head_dim).permute(0, 2, 1, 3)
    return out.to(q.dtype), lse.reshape(batch, q_heads, q_len)


def prefill_attention_reference(q, k, v, *, causal=True, q_offset=0, scale=None):
    """Reference for `prefill_attention`: q [B, Tq, Hq, D], k, v [B, Tk, Hkv, D] -> [B, Tq, Hq, D]."""
    return attention_with_lse(q, k, v, causal=causal, q_offset=q_offset, scale=scale)[0]


def decode_attention_reference(q, k_cache, v_cache, cache_lens, *, scale=None):
    """Reference for `decode_attention`.

    q [B, Tq, Hq, D] are the newest Tq tokens of each sequence, already written to the cache;
    k_cache, v_cache [B, Tmax, Hkv, D]; cache_lens [B] counts valid positions including them.
    Query i of sequence b sits at position cache_lens[b] - Tq + i and sees keys up to it.
    """
    q_len = q.shape[1]
    lens = cache_lens.to(torch.int64)
    return attention_with_lse(
        q, k_cache, v_cache, causal=True, q_offset=lens - q_len, scale=scale, key_lens=lens
    )[0]


def merge_attention(out_a, lse_a, out_b, lse_b):
    """Exact merge of two attentions of the same queries over disjoint key sets.

    out_* [B, T, H, D], lse_* [B, H, T] -> (out, lse). A part with lse = -inf contributes nothing.
    """
    lse = torch.logaddexp(lse_a, lse_b)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    weight_a = torch.exp(lse_a - safe).transpose(1, 2).unsqueeze(-1)
    weight_b = torch.exp(lse_b - safe).transpose(1, 2).unsqueeze(-1)
    out = weight_a * out_a.to(weight_a.dtype) + weight_b * out_b.to(weight_b.dtype)
    return out.to(out_a.dtype), lse
