"""Tensor-parallel building blocks. Each takes its shard of the checkpoint at load time.

Column-parallel: the output features are split over ranks (q/k/v, gate/up), no communication.
Row-parallel: the input features are split (o_proj, down_proj); partial outputs are summed.
"""

import torch
import torch.nn.functional as F
from torch import nn

from facli.checkpoint import CheckpointReader, Shard
from facli.errors import FacliError
from facli.parallel import comm
from facli.parallel.context import ParallelContext


def _split(size: int, ctx: ParallelContext, what: str) -> int:
    if size % ctx.world_size:
        raise FacliError(
            f"expected {what} ({size}) to be divisible by --devices ({ctx.world_size}); "
            "choose a device count that divides it"
        )
    return size // ctx.world_size


def _empty(shape, dtype, device) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)


class _ShardedLinear(nn.Module):
    """A linear layer W [out, in] of which this rank holds one slice along `shard_dim`."""

    shard_dim: int  # 0: output rows (column-parallel); 1: input columns (row-parallel)

    def __init__(self, in_features, out_features, *, bias, ctx, dtype, device):
        super().__init__()
        self.in_features, self.out_features, self.ctx = in_features, out_features, ctx
        shape = [out_features, in_features]
        what = "output features" if self.shard_dim == 0 else "input features"
        shape[self.shard_dim] = _split(shape[self.shard_dim], ctx, what)
        self.weight = _empty(tuple(shape), dtype, device)
        # A row-parallel bias is added once, after the sum, so every rank holds all of it.
        self.bias = _empty((shape[0],), dtype, device) if bias else None

    def load(self, reader: CheckpointReader, prefix: str) -> None:
        shard = Shard(self.shard_dim, self.ctx.rank, self.ctx.world_size)
        full = (self.out_features, self.in_features)
        self.weight.data = reader.read(f"{prefix}.weight", full, self.weight.dtype, self.weight.device, shard)
        if self.bias is not None:
            bias_shard = shard if self.shard_dim == 0 else None
            self.bias.data = reader.read(f"{prefix}.bias", full[:1], self.bias.dtype, self.bias.device, bias_shard)


class ColumnParallelLinear(_ShardedLinear):
    """y = x W^T + b with W [out, in]; this rank holds rows rank*out/N .. (rank+1)*out/N."""

    shard_dim = 0

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class RowParallelLinear(_ShardedLinear):
    """y = sum over ranks of x_local W_local^T (+ b once); this rank holds columns of W [out, in]."""

    shard_dim = 1

    def forward(self, x):
        """x [..., in/N] -> [..., out]; tiled over tokens as ctx.settings says (see comm)."""
        return comm.row_parallel_linear(x, self.weight, self.ctx, self.bias)


class VocabParallelEmbedding(nn.Module):
    """Embedding table [vocab, hidden] split over ranks by vocabulary rows."""

    def __init__(self, vocab_size, hidden_size, *, ctx, dtype, device):
        super().__init__()
        self.vocab_size, self.hidden_size, self.ctx = vocab_size, hidden_size, ctx
        self.local_vocab = _split(vocab_size, ctx, "vocab_size")
        self.first = ctx.rank * self.local_vocab
        self.weight = _empty((self.local_vocab, hidden_size), dtype, device)

    def load(self, reader: CheckpointReader, name: str) -> None:
        shard = Shard(0, self.ctx.rank, self.ctx.world_size)
        full = (self.vocab_size, self.hidden_size)
        self.weight.data = reader.read(name, full, self.weight.dtype, self.weight.device, shard)

    def forward(self, ids):
        if not self.ctx.is_distributed:
            return F.embedding(ids, self.weight)
        local = ids - self.first
        outside = (local < 0) | (local >= self.local_vocab)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0)
        return comm.all_reduce_sum(out, self.ctx)


class ParallelLMHead(nn.Module):
    """Logits over the vocabulary; each rank computes its vocabulary slice, then one gather."""

    def __init__(self, embedding: VocabParallelEmbedding | None, vocab_size, hidden_size, *, ctx, dtype, device):
        super().__init__()
        self.ctx, self.vocab_size, self.hidden_size = ctx, vocab_size, hidden_size
        self.tied = embedding
        if embedding is None:
            self.weight = _empty((_split(vocab_size, ctx, "vocab_size"), hidden_size), dtype, device)

    def load(self, reader: CheckpointReader, name: str) -> None:
        if self.tied is None:
            shard = Shard(0, self.ctx.rank, self.ctx.world_size)
            full = (self.vocab_size, self.hidden_size)
            self.weight.data = reader.read(name, full, self.weight.dtype, self.weight.device, shard)

    def forward(self, hidden):
        weight = self.tied.weight if self.tied is not None else self.weight
        logits = F.linear(hidden, weight).float()
        return comm.all_gather_last_dim(logits, self.ctx)
