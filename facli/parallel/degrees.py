"""Which tensor-parallel degrees a model allows: every split size must divide evenly.

(Bytes per rank and the AllReduce tile size are the planner's: facli/planner/memory.py and
facli/planner/time_model.py.)
"""

from facli.errors import FacliError
from facli.models.config import ModelConfig


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
