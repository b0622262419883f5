"""The Triton kernels of `facli.kernels.elementwise` (which documents them and holds the PyTorch
reference): RMSNorm with the residual add before it, rotary embeddings, SiLU(gate) * up, and the
sum of two ranks' row-parallel partials with what follows it. Each launcher runs on CUDA tensors,
and on CPU tensors under TRITON_INTERPRET=1 (the tests' lane).
"""

import torch
import triton
import triton.language as tl

from facli.kernels import common


@triton.jit
def _store_normed(y_row, W, x, offs, mask, cols, eps):
    """y = W * normalize(x), normalized in float32 and rounded to y's dtype before the scale."""
    x32 = x.to(tl.float32)
    inv_rms = 1.0 / tl.sqrt(tl.sum(x32 * x32, axis=0) / cols + eps)
    dtype = y_row.dtype.element_ty
    normed = (x32 * inv_rms).to(dtype)
    w = tl.load(W + offs, mask=mask, other=0.0)
    tl.store(y_row + offs, (w.to(tl.float32) * normed.to(tl.float32)).to(dtype), mask=mask)


@triton.jit
def _rms_norm_kernel(X, R, W, Y, S, stride_x, stride_r, stride_y, stride_s, cols, eps,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < cols
    x = tl.load(X + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(R + row * stride_r + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(X.dtype.element_ty)
        tl.store(S + row * stride_s + offs, x, mask=mask)
    _store_normed(Y + row * stride_y, W, x, offs, mask, cols, eps)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t as [rows, last dim] with a unit column stride, copied only when it has none."""
    rows = t.reshape(-1, t.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def rms_norm_triton(x, weight, eps, residual=None):
    cols = x.shape[-1]
    rows = _rows(x)
    out = common.empty(*rows.shape, dtype=x.dtype, device=x.device)
    summed = common.empty(*rows.shape, dtype=x.dtype, device=x.device) if residual is not None else out
    res = _rows(residual) if residual is not None else rows
    block = triton.next_power_of_2(cols)
    if rows.shape[0]:
        _rms_norm_kernel[(rows.shape[0],)](
            rows, res, weight, out, summed, rows.stride(0), res.stride(0), out.stride(0), summed.stride(0),
            cols, eps, HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=min(16, max(1, block // 256)))
    normed = out.view(x.shape)
    return normed if residual is None else (normed, summed.view(x.shape))


@triton.jit
def _pair_sum_kernel(A, B, R, S, Y, W, FLAG, sequence, rows, stride_a, stride_b, stride_r, stride_s,
                     stride_y, cols, eps, WAIT: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                     NORM: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    first_row = tl.program_id(0) * ROWS
    offs = tl.arange(0, BLOCK)
    mask = offs < cols
    if WAIT:
        # The peer's copy engine writes the rows, then the flag, behind a system-wide fence.
        # Spin with plain loads from L2 (a program per ROWS rows, so few spin), then one acquire
        # read orders the row loads after the flag.
        ready = tl.load(FLAG, volatile=True)
        while ready < sequence:
            ready = tl.load(FLAG, volatile=True)
        tl.atomic_add(FLAG, 0, sem="acquire", scope="sys")
    dtype = S.dtype.element_ty
    for index in range(ROWS):
        row = (first_row + index).to(tl.int64)
        ok = mask & (tl.full([BLOCK], 0, tl.int64) + row < rows)
        # .cg: straight from L2, which the peer's writes into this GPU's memory go through.
        a = tl.load(A + row * stride_a + offs, mask=ok, other=0.0, cache_modifier=".cg")
        b = tl.load(B + row * stride_b + offs, mask=ok, other=0.0, cache_modifier=".cg")
        x = (a.to(tl.float32) + b.to(tl.float32)).to(dtype)
        if HAS_RESIDUAL:
            r = tl.load(R + row * stride_r + offs, mask=ok, other=0.0)
            x = (x.to(tl.float32) + r.to(tl.float32)).to(dtype)
        tl.store(S + row * stride_s + offs, x, mask=ok)
        if NORM:
            _store_normed(Y + row * stride_y, W, x, offs, ok, cols, eps)


def pair_sum_triton(first, second, *, residual=None, norm_weight=None, eps=0.0, out=None,
                    flag=None, sequence=0):
    rows, cols = first.shape
    out = common.empty(rows, cols, dtype=first.dtype, device=first.device) if out is None else out
    normed = common.empty(rows, cols, dtype=first.dtype, device=first.device) if norm_weight is not None else out
    res = residual if residual is not None else first
    block = triton.next_power_of_2(cols)
    per_program = 16  # rows per program: few programs spin on the flag
    if rows:
        _pair_sum_kernel[(triton.cdiv(rows, per_program),)](
            first, second, res, out, normed, norm_weight if norm_weight is not None else first,
            flag if flag is not None else first, sequence, rows,
            first.stride(0), second.stride(0), res.stride(0), out.stride(0), normed.stride(0), cols, eps,
            WAIT=flag is not None, HAS_RESIDUAL=residual is not None, NORM=norm_weight is not None,
            ROWS=per_program, BLOCK=block, num_warps=min(16, max(1, block // 256)))
    return (normed, out) if norm_weight is not None else out


@triton.jit
def rotate_halves(x1, x2, c1, c2, s1, s2, dtype):
    """(x1, x2) * cos + (-x2, x1) * sin over float32 halves of head vectors, in `dtype`: each
    product and the sum rounded to the model dtype, as PyTorch's three kernels do (launches
    pass enable_fp_fusion=False so that they do not become FMAs)."""
    y1 = (x1 * c1).to(dtype) + (-(x2 * s1)).to(dtype)
    y2 = (x2 * c2).to(dtype) + (x1 * s2).to(dtype)
    return y1.to(dtype), y2.to(dtype)


@triton.jit
def _rotary_kernel(X, COS, SIN, Y, seq_len, heads, stride_xb, stride_xt, stride_xh,
                   stride_yb, stride_yt, stride_yh, stride_cb, stride_c,
                   HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    token = tl.program_id(0)
    b = (token // seq_len).to(tl.int64)
    t = (token % seq_len).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h[:, None] < heads) & (offs_d[None, :] < HALF)
    x_row = X + b * stride_xb + t * stride_xt + offs_h[:, None] * stride_xh + offs_d[None, :]
    y_row = Y + b * stride_yb + t * stride_yt + offs_h[:, None] * stride_yh + offs_d[None, :]
    cs = b * stride_cb + t * stride_c
    x1 = tl.load(x_row, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_row + HALF, mask=mask, other=0.0).to(tl.float32)
    c1 = tl.load(COS + cs + offs_d, mask=offs_d < HALF, other=0.0).to(tl.float32)[None, :]
    c2 = tl.load(COS + cs + HALF + offs_d, mask=offs_d < HALF, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(SIN + cs + offs_d, mask=offs_d < HALF, other=0.0).to(tl.float32)[None, :]
    s2 = tl.load(SIN + cs + HALF + offs_d, mask=offs_d < HALF, other=0.0).to(tl.float32)[None, :]
    y1, y2 = rotate_halves(x1, x2, c1, c2, s1, s2, Y.dtype.element_ty)
    tl.store(y_row, y1, mask=mask)
    tl.store(y_row + HALF, y2, mask=mask)


def apply_rotary_triton(x, cos, sin):
    batch, seq_len, heads, dim = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()
    per_sequence = cos.dim() == 3
    out = common.empty(*x.shape, dtype=x.dtype, device=x.device)
    if x.numel():
        block_h = triton.next_power_of_2(heads)
        block_d = triton.next_power_of_2(dim // 2)
        _rotary_kernel[(batch * seq_len,)](
            x, cos, sin, out, seq_len, heads, x.stride(0), x.stride(1), x.stride(2),
            out.stride(0), out.stride(1), out.stride(2),
            cos.stride(0) if per_sequence else 0, cos.stride(-2),
            HALF=dim // 2, BLOCK_H=block_h, BLOCK_D=block_d,
            num_warps=min(8, max(1, block_h * block_d // 256)), enable_fp_fusion=False)
    return out


@triton.jit
def _silu_mul_kernel(G, U, Y, stride_g, stride_u, cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < cols
    g = tl.load(G + row * stride_g + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + offs, mask=mask, other=0.0).to(tl.float32)
    dtype = Y.dtype.element_ty
    silu = (g / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32)
    tl.store(Y + row * cols + offs, (silu * u).to(dtype), mask=mask)


def silu_mul_triton(gate, up):
    g, u = _rows(gate), _rows(up)
    out = common.empty(*gate.shape, dtype=gate.dtype, device=gate.device)
    block = 1024
    if g.numel():
        _silu_mul_kernel[(g.shape[0], triton.cdiv(g.shape[1], block))](
            g, u, out, g.stride(0), u.stride(0), g.shape[1], BLOCK=block, num_warps=4)
    return out
