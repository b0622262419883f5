"""Checks and allocation shared by the Triton launchers, and `triton_module`, through which
facli's dispatchers import them: Triton is published for Linux only, and the CPU path must
import and run without it."""

import functools
import importlib
import os

import torch

from facli.errors import FacliError
from facli.planner.policy import READS_FP8_FROM

NO_TRITON = ("expected the triton package for facli's GPU kernels, got none installed; on Linux "
             "install it (pip install triton), elsewhere run on the CPU (--device cpu)")


@functools.cache
def triton_module(name: str):
    """The Triton module facli.kernels.<name> (its @triton.jit kernels and launchers), imported
    on first use. Raises FacliError where the triton package is not installed."""
    try:
        return importlib.import_module(f"facli.kernels.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != "triton":
            raise
        raise FacliError(NO_TRITON) from None


def empty(*shape, dtype, device):
    """Allocates outputs and scratch; tests replace it with a NaN-filling allocator."""
    return torch.empty(*shape, dtype=dtype, device=device)


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def check_attention_inputs(q, k, v, *, fp8_cache: bool = False):
    """Shared shape/dtype/stride checks of the attention launchers (fp8_cache: k and v are
    float8_e4m3fn with scales, q in the compute dtype)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"expected 4-d q, k, v [B, T, H, D], got {q.dim()}, {k.dim()}, {v.dim()} dims")
    if k.shape != v.shape:
        raise ValueError(f"expected k and v of one shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"expected q and k to share B and D, got {tuple(q.shape)} and {tuple(k.shape)}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"expected Hq a multiple of Hkv, got {q.shape[2]} and {k.shape[2]}")
    cache_dtype = torch.float8_e4m3fn if fp8_cache else q.dtype
    if not cache_dtype == k.dtype == v.dtype:
        raise ValueError(f"expected q, k, v of one dtype (or fp8 k, v with scales), got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[3] > 256:
        raise ValueError(f"expected head dim <= 256, got {q.shape[3]}")
    if q.device.type == "cuda" and q.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"expected float16 or bfloat16 on the GPU, got {q.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"expected one device, got {q.device}, {k.device}, {v.device}")
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("expected k and v with a unit stride in the head dim")


def check_fp8_scales(k_cache, v_cache, k_scales, v_scales) -> bool:
    """True for an fp8 cache with its scales (float32 [B, T, Hkv], any strides, the same for
    both); raises on a half-given or misshapen pair."""
    if k_scales is None and v_scales is None:
        return False
    if k_scales is None or v_scales is None:
        raise ValueError("expected both k_scales and v_scales, or neither")
    if k_cache.dtype != torch.float8_e4m3fn or v_cache.dtype != torch.float8_e4m3fn:
        raise ValueError(f"expected float8_e4m3fn caches with scales, got {k_cache.dtype}")
    expected = tuple(k_cache.shape[:3])
    for name, scales in (("k_scales", k_scales), ("v_scales", v_scales)):
        if tuple(scales.shape) != expected or scales.dtype != torch.float32:
            raise ValueError(f"expected {name} float32 {expected}, got {scales.dtype} {tuple(scales.shape)}")
    if k_scales.stride() != v_scales.stride():
        raise ValueError("expected k_scales and v_scales with the same strides")
    return True


def reads_e4m3(device) -> bool:
    """Whether the Triton kernels read float8_e4m3fn on `device`: GPUs from READS_FP8_FROM on
    (their conversions need sm89's cvt), and the CPU lane's interpreter."""
    return device.type != "cuda" or torch.cuda.get_device_capability(device) >= READS_FP8_FROM


def check_q_offset(q_offset):
    """The Triton prefill kernels take the chunk's first position as a Python int."""
    if not isinstance(q_offset, int) or q_offset < 0:
        raise ValueError(f"expected q_offset a non-negative int, got {q_offset!r}")
