"""The projections: `linear` is F.linear, except that one row of float16/bfloat16 on a GPU goes
to facli's matrix-vector kernel (`gemv_triton`, imported on first use: Triton is installed on
Linux only), and a matrix in oneDNN's packed CPU layout to oneDNN's linear.
"""

import torch
import torch.nn.functional as F

from facli.kernels import common


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           residual: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) (+ residual, shaped as the output): through gemv_triton for one
    row on a GPU in 16 bits, with the residual added in its epilogue; through oneDNN for a packed
    CPU matrix."""
    one_row = x.numel() == weight.shape[1] and not weight.is_mkldnn and weight.stride(1) == 1
    if one_row and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and x.dtype == weight.dtype:
        return common.triton_module("gemv_triton").gemv_triton(x, weight, bias, residual=residual)
    if weight.is_mkldnn:
        out = torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    else:
        out = F.linear(x, weight, bias)
    return out if residual is None else out.add_(residual)
