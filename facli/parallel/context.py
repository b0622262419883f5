"""Who this process is in a tensor-parallel group."""

from dataclasses import dataclass


@dataclass(frozen=True)
class ParallelContext:
    """rank of world_size; world_size 1 means no distributed setup at all."""

    rank: int = 0
    world_size: int = 1

    def __post_init__(self):
        assert 0 <= self.rank < self.world_size

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_writer(self) -> bool:
        """Only rank 0 prints and writes files."""
        return self.rank == 0


SINGLE_PROCESS = ParallelContext()
