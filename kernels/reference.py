"""Plain-PyTorch attention: the oracle for the Triton kernels and the CPU path.

Two ways, one contract (`attention_with_lse`):
- CPU tensors in float32/bfloat16/float16 go to PyTorch's CPU flash-attention kernel
  (`aten._scaled_dot_product_flash_attention_for_cpu`, what `F.scaled_dot_product_attention`
  runs on the CPU): blocked, multithreaded, GQA without repeating K/V, skipping the blocks a
  causal mask hides, and it returns the log-sum-exp. Its causal mask is aligned top-left, so a
  chunk of queries after a cached prefix attends to the prefix unmasked and to its own keys
  causally, and the two parts are merged exactly (`merge_attention`). A single float32 query
  (a decode step) takes two matrix products instead (`_one_query`).
- Everything else (float64: the oracle the kernel tests compare against; GPU tensors; shapes
  where a query sees no key) takes the tiled loop: tiled over query blocks so that no [Tq, Tk]
  matrix larger than one block is ever held (the block shrinks as Tk grows so that one block's
  scores stay under SCORE_BUDGET elements; it runs at 256K keys), computed in float32 (float64
  inputs stay float64).
"""

import math

import torch

QUERY_BLOCK = 512
SCORE_BUDGET = 1 << 28  # elements of one block's [B, H, block, Tk] scores (1 GiB in float32)
FLASH_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_cpu_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


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
    return _attention(q, k, v, causal=causal, q_offset=q_offset, scale=scale, key_lens=key_lens,
                      with_lse=True)


def _attention(q, k, v, *, causal, q_offset, scale, key_lens, with_lse):
    """`attention_with_lse`; without with_lse the lse may be None (a CPU decode step then
    skips it)."""
    assert q.shape[2] % k.shape[2] == 0, "Hq must be a multiple of Hkv"
    if q.device.type == "cpu" and q.dtype in FLASH_DTYPES and q.dtype == k.dtype == v.dtype:
        rows = _flash_rows(q, k, causal, q_offset, key_lens)
        if rows is not None:
            return _flash_with_lse(q, k, v, rows, causal, scale, with_lse)
    return _tiled_with_lse(q, k, v, causal=causal, q_offset=q_offset, scale=scale,
                           key_lens=key_lens)


def _flash_rows(q, k, causal, q_offset, key_lens):
    """Per sequence (q_offset, keys it may see), or None when a query would see no key (the flash
    kernel would return NaN there) or, causally, queries lie past the last key."""
    batch, q_len, k_len = q.shape[0], q.shape[1], k.shape[1]
    offsets = _per_row(q_offset, batch)
    lengths = [k_len] * batch if key_lens is None else [
        min(n, k_len) for n in _per_row(key_lens, batch)]
    if q_len == 0 or min(lengths) <= 0:
        return None
    if causal and any(o < 0 or o + q_len > n for o, n in zip(offsets, lengths)):
        return None
    return list(zip(offsets, lengths))


def _per_row(value, batch: int) -> list[int]:
    """An int or a [B] / one-element CPU tensor as B Python ints (on the CPU, reading them costs
    no device synchronization)."""
    if isinstance(value, torch.Tensor):
        values = value.reshape(-1).tolist()
        return values * batch if len(values) == 1 else values
    return [int(value)] * batch


def _flash_with_lse(q, k, v, rows, causal, scale, with_lse):
    """The flash-kernel path for the rows `_flash_rows` accepted: one call (two when causal past
    a prefix) per distinct (offset, length), normally one for the whole batch."""
    if all(row == rows[0] for row in rows):
        return _flash_same_row(q, k, v, *rows[0], causal, scale, with_lse)
    parts = [_flash_same_row(q[b:b + 1], k[b:b + 1], v[b:b + 1], *row, causal, scale, with_lse)
             for b, row in enumerate(rows)]
    lse = torch.cat([lse for _, lse in parts]) if with_lse else None
    return torch.cat([out for out, _ in parts]), lse


def _flash_same_row(q, k, v, offset, length, causal, scale, with_lse):
    q_len = q.shape[1]
    if q_len == 1:  # one query sees every key up to its own position: no mask at all
        seen = offset + 1 if causal else length
        if seen < k.shape[1]:
            k, v = k[:, :seen], v[:, :seen]
        return _one_query(q, k, v, scale, with_lse)
    if not causal:
        return _flash(q, k[:, :length], v[:, :length], scale=scale)
    own = _flash(q, k[:, offset:offset + q_len], v[:, offset:offset + q_len], True, scale,
                 copy_keys=True)
    if offset == 0:
        return own
    prefix = _flash(q, k[:, :offset], v[:, :offset], scale=scale)
    return merge_attention(*prefix, *own)


def _flash(q, k, v, causal=False, scale=None, copy_keys=False):
    """PyTorch's CPU flash attention on [B, T, H, D] views: out [B, Tq, Hq, D] in q's dtype,
    lse [B, Hq, Tq] float32. The kernel runs faster on head-major rows ([B, H, T, D]
    contiguous) than through the cache's token-major strides, so the queries are copied so
    (memory of the chunk's size), and so are k, v with copy_keys (the chunk's own keys; a
    cached prefix is read in place, where a copy would grow with the context)."""
    keys, values = k.transpose(1, 2), v.transpose(1, 2)
    if copy_keys:
        keys, values = keys.contiguous(), values.contiguous()
    out, lse = _cpu_flash(q.transpose(1, 2).contiguous(), keys, values, 0.0, causal, scale=scale)
    return out.transpose(1, 2), lse


def _one_query(q, k, v, scale=None, with_lse=True):
    """One query per head (q [B, 1, Hq, D]) over every key of k, v [B, Tk, Hkv, D]. In float32,
    per sequence, two matrix products over the cache in place, [Hkv, group, D] @ [Hkv, D, Tk]:
    each K/V row is read once for its whole GQA group, where the flash kernel reads it once per
    query head in blocks sized for many queries; a few PyTorch calls, as a decode step of every
    layer needs. Half dtypes keep the flash kernel, which accumulates in float32. Without
    with_lse the lse is None."""
    if q.dtype != torch.float32:
        return _flash(q, k, v, scale=scale)
    batch, _, q_heads, head_dim = q.shape
    kv_heads = k.shape[2]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    queries = q.reshape(batch, kv_heads, q_heads // kv_heads, head_dim)
    outs, lses = [], []
    for row in range(batch):
        scores = torch.matmul(queries[row], k[row].permute(1, 2, 0)).mul_(scale)  # [Hkv, group, Tk]
        if with_lse:
            lses.append(torch.logsumexp(scores, dim=-1, keepdim=True))
            probs = scores.sub_(lses[-1]).exp_()
        else:
            probs = torch.softmax(scores, dim=-1)
        outs.append(torch.matmul(probs, v[row].transpose(0, 1)))
    out = (outs[0] if batch == 1 else torch.stack(outs)).reshape(batch, 1, q_heads, head_dim)
    if not with_lse:
        return out, None
    return out, (lses[0] if batch == 1 else torch.stack(lses)).reshape(batch, q_heads, 1)


def _tiled_with_lse(q, k, v, *, causal, q_offset, scale, key_lens):
    """The tiled loop: `attention_with_lse` for any device and dtype."""
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
    return _attention(q, k, v, causal=causal, q_offset=q_offset, scale=scale, key_lens=None,
                      with_lse=False)[0]


def decode_attention_reference(q, k_cache, v_cache, cache_lens, *, scale=None):
    """Reference for `decode_attention`.

    q [B, Tq, Hq, D] are the newest Tq tokens of each sequence, already written to the cache;
    k_cache, v_cache [B, Tmax, Hkv, D]; cache_lens [B] counts valid positions including them.
    Query i of sequence b sits at position cache_lens[b] - Tq + i and sees keys up to it.
    """
    q_len = q.shape[1]
    lens = cache_lens.to(torch.int64)
    return _attention(q, k_cache, v_cache, causal=True, q_offset=lens - q_len, scale=scale,
                      key_lens=lens, with_lse=False)[0]


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
