"""Decode's projections at one token: y = x W^T (+ b) for a single row x and W [N, K].

At batch 1 every projection is a matrix-vector product bound by reading W once. cuBLAS reads a
7B layer's projections at 2.5-3.8 TB/s at one token on an H200, the smaller matrices the slower
(o_proj, 4096 x 4096: 2.5), against 4.4-4.5 TB/s for facli's decode attention kernel
(benchmarks/gemv.py; docs/performance.md). Here each program owns `block_n` rows and streams
them along K in `block_k`-wide tiles, products accumulated in float32 registers and summed
across the tile at the end: many small programs keep enough loads in flight on every SM even
for 4096 rows.

`facli.kernels.gemv.linear` takes this kernel for one CUDA row of float16/bfloat16 and leaves
everything else (several rows, float32, CPU tensors) to `F.linear`. The launcher also runs on CPU
tensors under TRITON_INTERPRET=1, which the tests use.
"""

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from facli.kernels import common


@dataclass(frozen=True)
class GemvConfig:
    block_n: int
    block_k: int
    num_warps: int


def gemv_config(n: int, k: int) -> GemvConfig:
    """Rows per program: enough programs for several per SM on a 4096-row matrix."""
    return GemvConfig(block_n=4 if n <= 8192 else 8, block_k=512, num_warps=4)


@triton.jit
def _gemv_kernel(W, X, B, R, Y, N, K, stride_w, HAS_BIAS: tl.constexpr,
                 HAS_RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 EVEN_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    cols = tl.arange(0, BLOCK_K)
    w_ptrs = W + rows[:, None].to(tl.int64) * stride_w + cols[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        if EVEN_K:
            x = tl.load(X + start + cols)
            w = tl.load(w_ptrs, mask=row_mask[:, None], other=0.0, eviction_policy="evict_first")
        else:
            col_mask = start + cols < K
            x = tl.load(X + start + cols, mask=col_mask, other=0.0)
            w = tl.load(w_ptrs, mask=row_mask[:, None] & col_mask[None, :], other=0.0,
                        eviction_policy="evict_first")
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
        w_ptrs += BLOCK_K
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(B + rows, mask=row_mask, other=0.0).to(tl.float32)
    dtype = Y.dtype.element_ty
    if HAS_RESIDUAL:  # rounded, then added and rounded again: as `linear(x) + residual`
        y = y.to(dtype).to(tl.float32) + tl.load(R + rows, mask=row_mask, other=0.0).to(tl.float32)
    tl.store(Y + rows, y.to(dtype), mask=row_mask)


def gemv_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                config: GemvConfig | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] holding one row, weight [N, K] (unit stride along K) -> [..., N] in x's dtype;
    with residual (N values), that added to the rounded product."""
    n, k = weight.shape
    if x.numel() != k or weight.stride(1) != 1:
        raise ValueError(f"expected one row of {k} features and a weight with unit stride along "
                         f"them, got x {tuple(x.shape)} and weight strides {weight.stride()}")
    if residual is not None and residual.numel() != n:
        raise ValueError(f"expected a residual of {n} values, got {tuple(residual.shape)}")
    config = config or gemv_config(n, k)
    row = x.reshape(k).contiguous()
    out = common.empty(*x.shape[:-1], n, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(n, config.block_n),)
    res = residual.reshape(n).contiguous() if residual is not None else row
    _gemv_kernel[grid](weight, row, bias if bias is not None else row, res, out, n, k,
                       weight.stride(0), HAS_BIAS=bias is not None,
                       HAS_RESIDUAL=residual is not None, BLOCK_N=config.block_n,
                       BLOCK_K=config.block_k, EVEN_K=k % config.block_k == 0,
                       num_warps=config.num_warps)
    return out
