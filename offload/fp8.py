"""fp8 (e4m3) storage for KV: one float32 scale per token and KV head.

e4m3 keeps 3 mantissa bits, so a stored value is within 2^-4 (6.25%) of the original relative
to its own size, or near zero within half a subnormal step (2^-10 times the scale).
The scale maps each head vector's largest magnitude to 448, e4m3's largest finite value.
One scale per token and head costs 4 bytes per D fp8 bytes (3% at D = 128); it is as cheap as
a per-chunk scale stored per position and does not depend on how a prompt was chunked.
"""

import torch

from facli.kernels import E4M3_MAX, FP8, common, dequantize_fp8, quantize_fp8

__all__ = ["E4M3_MAX", "FP8", "dequantize", "dequantize_into", "quantize", "store_rows_fp8"]

# x [B, T, H, D] -> (values [B, T, H, D] float8_e4m3fn, scales [B, T, H] float32).
quantize = quantize_fp8
# values [..., H, D] float8_e4m3fn, scales [..., H] -> [..., H, D] in `dtype`.
dequantize = dequantize_fp8


def dequantize_into(out: torch.Tensor, values: torch.Tensor, scales: torch.Tensor,
                    block: int = 4096) -> None:
    """out[:, i] = dequantize(values[:, i], scales[:, i]) for every position i.

    out, values [B, T, H, D]; scales [B, T, H]. On a GPU one kernel reads the bytes and writes
    out; elsewhere this works over `block` positions at a time so the float32 temporary stays
    small (a whole 256K-token layer would need 4 GiB of it).
    """
    if out.is_cuda and common.triton_module("fp8_kv").dequantize_rows_triton(out, values, scales):
        return
    for start in range(0, values.shape[1], block):
        stop = min(start + block, values.shape[1])
        out[:, start:stop] = values[:, start:stop].float() * scales[:, start:stop].unsqueeze(-1)


def store_rows_fp8(k, v, k_cache, v_cache, k_scales, v_scales, start: int) -> None:
    """k, v [B, T, Hkv, D] quantized as `quantize` makes them on the GPU and stored in the caches
    at positions start..start+T, in one pass over the chunk on a GPU that converts to e4m3
    (facli.kernels.fp8_kv.store_rows_fp8_triton)."""
    common.triton_module("fp8_kv").store_rows_fp8_triton(k, v, k_cache, v_cache, k_scales,
                                                         v_scales, start)
