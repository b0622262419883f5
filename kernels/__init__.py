"""FastAttention: facli's attention functions.

CUDA tensors in float16/bfloat16 go to the Triton kernels (prefill on Hopper to the Gluon kernel
of `prefill_hopper` where it takes the shapes, fp8 K/V with scales too where the run rules let
it, else to the Triton kernel; both read e4m3 directly); everything else (CPU tensors, float32)
to the plain-PyTorch reference.
`backend="triton"` forces the kernels, which on a CPU run only under TRITON_INTERPRET=1 (the
tests' lane); `backend="reference"` forces the reference.
The Triton modules (`prefill`, `prefill_hopper`, `decode`) are imported on the first call that
takes them: Triton is installed on Linux only, and the CPU path runs without it.
"""

import torch

from facli.kernels import common
from facli.kernels.configs import SMALL_QUERIES
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


FP8 = torch.float8_e4m3fn
E4M3_MAX = 448.0
# Smallest amax given a scale: keeps all-zero vectors (padding, zero-init caches) finite.
_TINY_AMAX = 1e-12


def quantize_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., H, D] -> (values float8_e4m3fn, scales [..., H] float32): each head vector's
    largest magnitude maps to 448, e4m3's largest finite value."""
    x32 = x.float()
    scale = x32.abs().amax(dim=-1).clamp_min(_TINY_AMAX) / E4M3_MAX
    # Clamping guards against the scale's rounding pushing the largest element past 448.
    values = (x32 / scale.unsqueeze(-1)).clamp(-E4M3_MAX, E4M3_MAX).to(FP8)
    return values, scale


def dequantize_fp8(values, scales, dtype):
    """values [B, T, H, D] float8_e4m3fn times scales [B, T, H], in `dtype`."""
    wide = torch.promote_types(dtype, torch.float32)
    return (values.to(wide) * scales.to(wide).unsqueeze(-1)).to(dtype)


def prefill_attention(q, k, v, *, causal=True, q_offset=0, scale=None, return_lse=False,
                      backend="auto", k_scales=None, v_scales=None):
    """Attention of q [B, Tq, Hq, D] over k, v [B, Tk, Hkv, D] -> [B, Tq, Hq, D].

    Hq is a multiple of Hkv (grouped-query attention, K/V never repeated in memory). Query i
    sits at absolute position q_offset + i; with causal=True it sees keys at positions <= its
    own, so a chunk of a long prompt attends to the whole cached prefix and causally to itself.
    k and v may be strided views (e.g. cache[:, :start + T]); only the head dim must be unit
    stride. D <= 256 (64, 80, 96, 128, 256 are the tested ones); float16/bfloat16 on the GPU.
    q_offset is a Python int on the Triton path (a [B] tensor only on the reference path).
    scale defaults to 1/sqrt(D). With return_lse, returns (out, lse [B, Hq, Tq] float32, natural
    log), the input `merge_attention` needs.
    k_scales, v_scales [B, Tk, Hkv] float32: k and v are float8_e4m3fn and each stored head vector
    is multiplied by its scale. The Triton kernel reads e4m3 and the scales directly (GPUs from
    compute capability 8.9, and the interpreter); the reference and older GPUs attend over a
    dequantized copy in q's dtype.
    """
    kwargs = {"causal": causal, "q_offset": q_offset, "scale": scale, "return_lse": return_lse}
    if common.check_fp8_scales(k, v, k_scales, v_scales):
        if _use_triton(q, backend) and common.reads_e4m3(q.device):
            kwargs.update(k_scales=k_scales, v_scales=v_scales)
        else:
            k, v = dequantize_fp8(k, k_scales, q.dtype), dequantize_fp8(v, v_scales, q.dtype)
    if _use_triton(q, backend):
        triton_prefill = common.triton_module("prefill").prefill_attention_triton
        if q.shape[1] > SMALL_QUERIES:
            hopper = common.triton_module("prefill_hopper")
            if hopper.supports(q, k, v):
                return hopper.prefill_or_fall_back(triton_prefill, q, k, v, **kwargs)
        return triton_prefill(q, k, v, **kwargs)
    if return_lse:
        return attention_with_lse(q, k, v, causal=causal, q_offset=q_offset, scale=scale)
    return prefill_attention_reference(q, k, v, causal=causal, q_offset=q_offset, scale=scale)


def prefill_reads_fp8_at_speed(q) -> bool:
    """Whether `prefill_attention` over an fp8 cache, for queries like q, runs about as fast as
    over a 16-bit one: on Hopper the Gluon kernel dequantizes tiles in shared memory. Elsewhere the
    Triton kernel's e4m3 path is slower than dequantizing tiles first and attending over those."""
    if not (_use_triton(q, "auto") and q.shape[1] > SMALL_QUERIES):
        return False
    return common.triton_module("prefill_hopper").takes_fp8(q)


def decode_attention(q, k_cache, v_cache, cache_lens, *, scale=None, return_lse=False,
                     backend="auto", k_scales=None, v_scales=None):
    """Attention of the newest tokens q [B, Tq, Hq, D] over caches [B, Tmax, Hkv, D].

    cache_lens [B] (int, on q's device) counts each sequence's valid cache positions, the new
    tokens included: query i of sequence b sits at position cache_lens[b] - Tq + i and sees keys
    up to it. Split-KV over Tmax with the split count chosen from shapes only, and no host
    synchronization, so the call can be captured in a CUDA graph. With return_lse, returns
    (out, lse [B, Hq, Tq] float32, natural log).
    k_scales, v_scales [B, Tmax, Hkv] float32: the caches are float8_e4m3fn and each stored head
    vector is multiplied by its scale (the Triton kernel reads e4m3 directly).
    """
    if _use_triton(q, backend):
        return common.triton_module("decode").decode_attention_triton(
            q, k_cache, v_cache, cache_lens, scale=scale, return_lse=return_lse,
            k_scales=k_scales, v_scales=v_scales)
    if k_scales is not None:
        k_cache = dequantize_fp8(k_cache, k_scales, q.dtype)
        v_cache = dequantize_fp8(v_cache, v_scales, q.dtype)
    if return_lse:
        lens = cache_lens.to(torch.int64)
        return attention_with_lse(q, k_cache, v_cache, causal=True, q_offset=lens - q.shape[1],
                                  scale=scale, key_lens=lens)
    return decode_attention_reference(q, k_cache, v_cache, cache_lens, scale=scale)


__all__ = [
    "attention_with_lse",
    "decode_attention",
    "decode_attention_reference",
    "merge_attention",
    "prefill_attention",
    "prefill_attention_reference",
    "prefill_reads_fp8_at_speed",
]
