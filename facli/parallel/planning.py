"""What tensor parallelism means for a plan: valid degrees, bytes per rank, the AllReduce tile.

Pure functions of the model config and hardware numbers (no torch.cuda calls), for the planner.
"""

import math

from facli.config import ModelConfig
from facli.errors import FacliError

# Per rank, outside PyTorch's allocator: NCCL's communicator buffers (NCCL_BUFFSIZE, 4 MiB per
# channel and peer, both directions) and its kernels' context. An upper estimate for 8 ranks.
NCCL_RESERVED_BYTES = 512 * 2**20

# Below about this many tokens a GEMM of hidden-size width runs well short of the tensor cores'
# rate (too few output tiles to fill ~130 SMs), so smaller AllReduce tiles cost more than they hide.
MIN_TILE_TOKENS = 1024
MAX_TILE_TOKENS = 8192
TILE_GRANULE = 256


def sharded_sizes(config: ModelConfig) -> dict[str, int]:
    """The sizes tensor parallelism splits: each must be divisible by the rank count."""
    return {
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "intermediate_size": config.intermediate_size,
        "vocab_size": config.vocab_size,
    }


def valid_degrees(config: ModelConfig, limit: int = 8) -> list[int]:
    """Rank counts up to `limit` that divide every sharded size."""
    sizes = sharded_sizes(config).values()
    return [n for n in range(1, limit + 1) if all(size % n == 0 for size in sizes)]


def check_tensor_parallel(config: ModelConfig, world_size: int) -> None:
    """Raise a FacliError unless `world_size` ranks can split this model evenly."""
    if world_size < 1:
        raise FacliError(f"expected --devices >= 1, got {world_size}")
    for name, size in sharded_sizes(config).items():
        if size % world_size:
            choices = ", ".join(str(n) for n in valid_degrees(config))
            raise FacliError(
                f"expected --devices to divide the model's {name} ({size}), got {world_size}; "
                f"use --devices {choices}"
            )


def weight_bytes_per_rank(config: ModelConfig, world_size: int, element_size: int) -> int:
    """Bytes of weights one rank holds: projections, embeddings and lm_head split, norms whole."""
    h, d, n = config.hidden_size, config.head_dim, world_size
    q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
    attention = (h * q + 2 * h * kv + q * h) // n
    if config.attention_bias:
        attention += (q + 2 * kv) // n
        attention += h if config.model_type != "qwen2" else 0  # o_proj bias, whole on every rank
    mlp = 3 * h * config.intermediate_size // n
    per_layer = attention + mlp + 2 * h
    embeddings = config.vocab_size * h // n * (1 if config.tie_word_embeddings else 2)
    return element_size * (config.num_hidden_layers * per_layer + embeddings + h)


def kv_bytes_per_token_per_rank(config: ModelConfig, world_size: int, element_size: int) -> int:
    """KV cache bytes per token on one rank: the cache is split by KV heads."""
    return config.kv_bytes_per_token * element_size // world_size


def comm_bytes_per_rank(config: ModelConfig, world_size: int, chunk_tokens: int,
                        element_size: int, batch: int = 1) -> int:
    """Communication buffers of one rank during a prefill chunk, beyond the layer activations.

    The embedding's all_reduce output [chunk, hidden], the logits all_gather (N parts of
    [B, V/N] float32 plus the concatenated [B, V]), and NCCL's own buffers.
    """
    if world_size == 1:
        return 0
    embedding = chunk_tokens * batch * config.hidden_size * element_size
    logits = 2 * batch * config.vocab_size * 4
    return embedding + logits + NCCL_RESERVED_BYTES


def choose_tile_tokens(hidden_size: int, world_size: int, element_size: int, *,
                       link_bytes_per_s: float, chunk_tokens: int | None = None,
                       collective_latency_s: float = 20e-6) -> int | None:
    """Tokens per AllReduce tile for a row-parallel output [T, hidden]; None for one rank.

    Only the last tile's AllReduce of each projection has no GEMM left to hide behind, so tiles
    should be small: about a quarter of the prefill chunk. But not so small that the
    per-collective latency exceeds a quarter of a tile's transfer time (bus bytes per token:
    hidden * element_size * 2 (N-1)/N over the link), nor that GEMMs drop off the tensor cores'
    rate (MIN_TILE_TOKENS).
    """
    if world_size == 1:
        return None
    bus_bytes_per_token = hidden_size * element_size * 2 * (world_size - 1) / world_size
    latency_bound = 4 * collective_latency_s * link_bytes_per_s / bus_bytes_per_token
    tokens = latency_bound if chunk_tokens is None else min(latency_bound, chunk_tokens / 4)
    tokens = max(MIN_TILE_TOKENS, math.ceil(tokens / TILE_GRANULE) * TILE_GRANULE)
    return min(tokens, MAX_TILE_TOKENS)
