"""FastAttention: facli's attention functions.

CUDA tensors in float16/bfloat16 go to the Triton kernels; everything else (CPU tensors, float32)
to the plain-PyTorch reference. `backend="triton"` forces the kernels, which on a CPU run only
under TRITON_INTERPRET=1 (the tests' lane); `backend="reference"` forces the reference.
"""

import torch

from facli.kernels.decode import decode_attention_triton
from facli.kernels.prefill import prefill_attention_triton
from facli.kernels.reference import (
    attention_with_lse,
    decode_attention_reference,
    merge_attention,
    prefill_attention_reference,
)

BACKENDS = ("auto", "triton", "reference")


def _use_triton(q, backend: str) -> bool:
    if backend not in BACKENDS:
        raise ValueError(f"expected backend in {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
    return backend == "triton"


def prefill_attention(q, k, v, *, causal=True, q_offset=0, scale=None, return_lse=False,
                      backend="auto"):
    """Attention of q [B, Tq, Hq, D] over k, v [B, Tk, Hkv, D] -> [B, Tq, Hq, D].

    Hq is a multiple of Hkv (grouped-query attention, K/V never repeated in memory). Query i
    sits at absolute position q_offset + i; with causal=True it sees keys at positions <= its
    own, so a chunk of a long prompt attends to the whole cached prefix and causally to itself.
    k and v may be strided views (e.g. cache[:, :start + T]); only the head dim must be unit
    stride. D <= 256 (64, 80, 96, 128, 256 are the tested ones); float16/bfloat16 on the GPU.
    q_offset is a Python int on the Triton path (a [B] tensor only on the reference path).
    scale defaults to 1/sqrt(D). With return_lse, returns (out, lse [B, Hq, Tq] float32, natural
    log), the input `merge_attention` needs.
    """
    if _use_triton(q, backend):
        return prefill_attention_triton(q, k, v, causal=causal, q_offset=q_offset, scale=scale,
                                        return_lse=return_lse)
    if return_lse:
        return attention_with_lse(q, k, v, causal=causal, q_offset=q_offset, scale=scale)
    return prefill_attention_reference(q, k, v, causal=causal, q_offset=q_offset, scale=scale)


def decode_attention(q, k_cache, v_cache, cache_lens, *, scale=None, return_lse=False,
                     backend="auto"):
    """Attention of the newest tokens q [B, Tq, Hq, D] over caches [B, Tmax, Hkv, D].

    cache_lens [B] (int, on q's device) counts each sequence's valid cache positions, the new
    tokens included: query i of sequence b sits at position cache_lens[b] - Tq + i and sees keys
    up to it. Split-KV over Tmax with the split count chosen from shapes only, and no host
    synchronization, so the call can be captured in a CUDA graph; splits past a sequence's
    length exit at once, so a cache much longer than cache_lens leaves most programs idle.
    bfloat16 caches use the asynchronous (unified-max) softmax with an exact fallback, float16
    caches the exact rescaling path (facli/kernels/decode.py says why). With return_lse, returns
    (out, lse [B, Hq, Tq] float32, natural log).
    """
    if _use_triton(q, backend):
        return decode_attention_triton(q, k_cache, v_cache, cache_lens, scale=scale,
                                       return_lse=return_lse)
    if return_lse:
        lens = cache_lens.to(torch.int64)
        return attention_with_lse(q, k_cache, v_cache, causal=True, q_offset=lens - q.shape[1],
                                  scale=scale, key_lens=lens)
    return decode_attention_reference(q, k_cache, v_cache, cache_lens, scale=scale)


__all__ = [
    "attention_with_lse",
    "decode_attention",
    "decode_attention_reference",
    "decode_attention_triton",
    "merge_attention",
    "prefill_attention",
    "prefill_attention_reference",
    "prefill_attention_triton",
]
