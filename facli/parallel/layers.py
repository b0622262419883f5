"""Tensor-parallel building blocks. Each takes its shard of the checkpoint at load time.

Column-parallel: the output features are split over ranks (q/k/v, gate/up, each group merged
into one GEMM), no communication.
Row-parallel: the input features are split (o_proj, down_proj); partial outputs are summed.
"""

import torch
import torch.nn.functional as F
from torch import nn

from facli.errors import FacliError
from facli.kernels import gemv
from facli.models.checkpoint import CheckpointReader, Shard
from facli.parallel import comm
from facli.parallel.context import ParallelContext


def _split(size: int, parallel: ParallelContext, what: str) -> int:
    if size % parallel.world_size:
        raise FacliError(
            f"expected {what} ({size}) to be divisible by --devices ({parallel.world_size}); "
            "choose a device count that divides it"
        )
    return size // parallel.world_size


def _empty(shape, dtype, device) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)


def _empty_matrix(shape, dtype, device) -> nn.Parameter:
    """An [out, in] weight in the layout its device multiplies fastest (see `_matrix_layout`)."""
    if torch.device(device).type == "cuda":
        return _empty(shape, dtype, device)
    input_major = torch.empty(shape[::-1], dtype=dtype, device=device).t()
    return nn.Parameter(input_major, requires_grad=False)


# oneDNN picks its packed layout for a number of rows; prompt chunks run hundreds to thousands.
PACKED_FOR_ROWS = 1024


def packs_on_cpu(dtype: torch.dtype) -> bool:
    """Whether float matrices of `dtype` can take oneDNN's packed layout on this CPU (float32
    only: bf16 GEMMs are slow on CPUs without native bf16 instructions either way)."""
    return (dtype == torch.float32 and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def _packed_on_cpu(weight: nn.Parameter) -> nn.Parameter:
    """oneDNN's packed copy of a CPU matrix, which `gemv.linear` multiplies through oneDNN:
    prompt GEMMs run about 1.3x faster than MKL's on the dense matrix."""
    packed = torch.ops.mkldnn._reorder_linear_weight(weight.data, PACKED_FOR_ROWS)
    return nn.Parameter(packed, requires_grad=False)


def _matrix_layout(weight: torch.Tensor) -> torch.Tensor:
    """On the CPU, the [out, in] matrix stored input-major (strides (1, out)): F.linear then runs
    as a GEMM whose weight streams row by row, which reads it from memory about 1.7x faster at
    one token (decode) and is no slower for prompts. GPUs keep the checkpoint's layout."""
    if weight.is_cuda or weight.stride(0) == 1:
        return weight
    return weight.t().contiguous().t()


class MergedColumnParallelLinear(nn.Module):
    """Column-parallel linears over one input (q/k/v, gate/up) as one GEMM: this rank's rows of
    every part stacked into one weight. Returns each part's output, views of one buffer."""

    def __init__(self, in_features, out_features: tuple[int, ...], *, bias, parallel, dtype, device):
        super().__init__()
        self.in_features, self.out_features, self.parallel = in_features, out_features, parallel
        self.sizes = [_split(size, parallel, "output features") for size in out_features]
        self.weight = _empty_matrix((sum(self.sizes), in_features), dtype, device)
        self.bias = _empty((sum(self.sizes),), dtype, device) if bias else None

    def load(self, reader: CheckpointReader, prefixes: tuple[str, ...]) -> None:
        shard = Shard(0, self.parallel.rank, self.parallel.world_size)
        dtype, device = self.weight.dtype, self.weight.device
        self.weight.data = _matrix_layout(torch.cat([
            reader.read(f"{prefix}.weight", (size, self.in_features), dtype, device, shard)
            for prefix, size in zip(prefixes, self.out_features)]))
        if self.bias is not None:
            self.bias.data = torch.cat([reader.read(f"{prefix}.bias", (size,), dtype, device, shard)
                                        for prefix, size in zip(prefixes, self.out_features)])

    def pack_on_cpu(self) -> None:
        self.weight = _packed_on_cpu(self.weight)

    def forward(self, x):
        return torch.split(gemv.linear(x, self.weight, self.bias), self.sizes, dim=-1)


class RowParallelLinear(nn.Module):
    """y = sum over ranks of x_local W_local^T (+ b once); this rank holds columns of W [out, in]."""

    def __init__(self, in_features, out_features, *, bias, parallel, dtype, device):
        super().__init__()
        self.in_features, self.out_features, self.parallel = in_features, out_features, parallel
        local_in = _split(in_features, parallel, "input features")
        self.weight = _empty_matrix((out_features, local_in), dtype, device)
        # The bias is added once, after the sum, so every rank holds all of it.
        self.bias = _empty((out_features,), dtype, device) if bias else None

    def load(self, reader: CheckpointReader, prefix: str) -> None:
        shard = Shard(1, self.parallel.rank, self.parallel.world_size)
        full = (self.out_features, self.in_features)
        self.weight.data = _matrix_layout(
            reader.read(f"{prefix}.weight", full, self.weight.dtype, self.weight.device, shard))
        if self.bias is not None:
            self.bias.data = reader.read(f"{prefix}.bias", full[:1], self.bias.dtype, self.bias.device)

    def pack_on_cpu(self) -> None:
        assert not self.parallel.is_distributed, "ranks exchange partial sums of dense matrices"
        self.weight = _packed_on_cpu(self.weight)

    def forward(self, x, residual=None):
        """x [..., in/N] -> [..., out] (+ residual); tiled over tokens as parallel.settings says
        (see comm)."""
        return comm.row_parallel_linear(x, self.weight, self.parallel, self.bias, residual)


class VocabParallelEmbedding(nn.Module):
    """Embedding table [vocab, hidden] split over ranks by vocabulary rows."""

    def __init__(self, vocab_size, hidden_size, *, parallel, dtype, device):
        super().__init__()
        self.vocab_size, self.hidden_size, self.parallel = vocab_size, hidden_size, parallel
        self.local_vocab = _split(vocab_size, parallel, "vocab_size")
        self.first = parallel.rank * self.local_vocab
        self.weight = _empty((self.local_vocab, hidden_size), dtype, device)

    def load(self, reader: CheckpointReader, name: str) -> None:
        shard = Shard(0, self.parallel.rank, self.parallel.world_size)
        full = (self.vocab_size, self.hidden_size)
        self.weight.data = reader.read(name, full, self.weight.dtype, self.weight.device, shard)

    def forward(self, ids):
        if not self.parallel.is_distributed:
            return F.embedding(ids, self.weight)
        local = ids - self.first
        outside = (local < 0) | (local >= self.local_vocab)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0)
        return comm.all_reduce_sum(out, self.parallel)


class ParallelLMHead(nn.Module):
    """Logits over the vocabulary; each rank computes its vocabulary slice, then one gather."""

    def __init__(self, embedding: VocabParallelEmbedding | None, vocab_size, hidden_size, *, parallel,
                 dtype, device):
        super().__init__()
        self.parallel, self.vocab_size, self.hidden_size = parallel, vocab_size, hidden_size
        self.tied = embedding
        if embedding is None:
            self.weight = _empty_matrix((_split(vocab_size, parallel, "vocab_size"), hidden_size),
                                        dtype, device)

    def load(self, reader: CheckpointReader, name: str) -> None:
        if self.tied is None:
            shard = Shard(0, self.parallel.rank, self.parallel.world_size)
            full = (self.vocab_size, self.hidden_size)
            self.weight.data = _matrix_layout(
                reader.read(name, full, self.weight.dtype, self.weight.device, shard))
        else:
            # The shared table in the head's layout: a lookup reads a prompt's rows strided,
            # which costs far less than the head's matrix-vector product gains at each token.
            self.tied.weight.data = _matrix_layout(self.tied.weight.data)

    def forward(self, hidden):
        weight = self.tied.weight if self.tied is not None else self.weight
        logits = gemv.linear(hidden, weight).float()
        return comm.all_gather_last_dim(logits, self.parallel)
