"""The decoder layer's elementwise work, fused: RMSNorm (with the residual add before it), rotary
embeddings (in a decode step together with storing K and V), SiLU(gate) * up, and the sum of two
ranks' row-parallel partials with what follows it (residual add, RMSNorm).

Unfused, each is five to ten PyTorch kernels over [tokens, hidden] tensors with float32
intermediates; at 32K tokens of a 7B model that is several GB of memory traffic per layer, as much
time as a GEMM. Each kernel here reads its inputs once and writes its outputs once, and rounds
where the PyTorch ops (and Hugging Face's Llama) round: rotary embeddings match them bit for
bit; RMSNorm (the order of its sum) and SiLU (the exponential) may differ by a rounding of the
intermediate they round, so by up to two roundings of the output.

CUDA tensors take the Triton kernels (`elementwise_triton`, imported on first use: Triton is
installed on Linux only); CPU tensors the PyTorch reference code here (`*_reference`). The Triton
launchers also run on CPU tensors under TRITON_INTERPRET=1, which the tests use.
"""

import torch
import torch.nn.functional as F

from facli.kernels import common, quantize_fp8


def _kernels():
    return common.triton_module("elementwise_triton")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """weight * normalize(x) over the last dim, normalized in float32 and rounded to x's dtype
    before the scale (as Hugging Face's LlamaRMSNorm). With residual: x + residual is normalized
    and (normalized, x + residual) returned, the sum rounded to x's dtype as `x + residual` is."""
    if x.is_cuda:
        return _kernels().rms_norm_triton(x, weight, eps, residual)
    return rms_norm_reference(x, weight, eps, residual)


def rms_norm_reference(x, weight, eps, residual=None):
    summed = x if residual is None else x + residual
    x32 = summed.float()
    normed = weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return normed if residual is None else (normed, summed)


def pair_sum(first: torch.Tensor, second: torch.Tensor, *, residual: torch.Tensor | None = None,
             norm_weight: torch.Tensor | None = None, eps: float = 0.0, out: torch.Tensor | None = None,
             flag: torch.Tensor | None = None, sequence: int = 0):
    """s = first + second (rounded, in that order) [+ residual, rounded], into `out` (or a new
    tensor); with norm_weight returns (norm_weight * normalize(s), s) as rms_norm does, else s.
    All [rows, cols]. With `flag` (CUDA, one int32), waits on the GPU until flag >= sequence
    before reading first and second: the two ranks' partial sums of a row-parallel projection,
    one of them pushed by the peer (facli.parallel.copy_engine)."""
    fused = first.is_cuda or common.interpreted()
    return (_kernels().pair_sum_triton if fused else pair_sum_reference)(
        first, second, residual=residual, norm_weight=norm_weight, eps=eps, out=out, flag=flag,
        sequence=sequence)


def pair_sum_reference(first, second, *, residual=None, norm_weight=None, eps=0.0, out=None,
                       flag=None, sequence=0):
    del flag, sequence  # CPU tensors are never pushed by a peer's copy engine
    summed = first + second
    summed = summed if residual is None else summed + residual
    out = summed if out is None else out.copy_(summed)
    return out if norm_weight is None else (rms_norm_reference(out, norm_weight, eps), out)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, D] rotated by cos, sin [T, D] (one set for every sequence) or [B, T, D] (halves
    layout, as in Hugging Face Llama)."""
    if x.is_cuda:
        return _kernels().apply_rotary_triton(x, cos, sin)
    return apply_rotary_reference(x, cos, sin)


def apply_rotary_reference(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[..., None, :] + rotated * sin[..., None, :]


def rotate_and_store_token(q, k, v, cos, sin, k_cache, v_cache, position: torch.Tensor, *,
                           k_scales=None, v_scales=None) -> torch.Tensor:
    """A decode step's q [B, 1, Hq, D], k, v [B, 1, Hkv, D] (unrotated): k rotated by cos, sin
    (as apply_rotary) and stored with v into k_cache, v_cache [B, T, Hkv, D] at `position`, a
    tensor on the caches' device with one position or one per sequence. With k_scales, v_scales
    [B, T, Hkv] the caches are float8_e4m3fn and each head vector is stored quantized as
    `quantize_fp8` makes it on the GPU. Returns q rotated. One kernel on a GPU, which a CUDA
    graph captures; PyTorch ops elsewhere."""
    if k_cache.is_cuda:
        return common.triton_module("token_store").rotate_and_store_token_triton(
            q, k, v, cos, sin, k_cache, v_cache, position, k_scales, v_scales)
    return rotate_and_store_token_reference(q, k, v, cos, sin, k_cache, v_cache, position,
                                            k_scales=k_scales, v_scales=v_scales)


def rotate_and_store_token_reference(q, k, v, cos, sin, k_cache, v_cache, position, *,
                                     k_scales=None, v_scales=None):
    k = apply_rotary_reference(k, cos, sin)
    at = (torch.arange(k.shape[0], device=position.device), position.expand(k.shape[0]))
    for cache, scales, x in ((k_cache, k_scales, k), (v_cache, v_scales, v)):
        if scales is None:
            cache.index_put_(at, x[:, 0])
        else:  # index_put_ has no float8 kernels: move the bytes
            values, x_scales = quantize_fp8(x)
            cache.view(torch.uint8).index_put_(at, values[:, 0].view(torch.uint8))
            scales.index_put_(at, x_scales[:, 0])
    return apply_rotary_reference(q, cos, sin)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up, SiLU rounded to the dtype before the product (as F.silu(gate) * up).
    gate and up may be column slices of one [..., 2 * I] projection output."""
    if gate.is_cuda:
        return _kernels().silu_mul_triton(gate, up)
    return silu_mul_reference(gate, up)


def silu_mul_reference(gate, up):
    return F.silu(gate) * up
