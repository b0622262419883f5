"""Who this process is in a tensor-parallel group, and how its collectives are run."""

from dataclasses import dataclass, field, replace

from facli.errors import FacliError


REDUCE_ENGINES = ("nccl", "copy")


@dataclass(frozen=True)
class TensorParallelSettings:
    """How row-parallel projections reduce their partial outputs.

    tile_tokens: split each row-parallel output along the token dimension into tiles of this
        many tokens; each tile's all_reduce starts as soon as its GEMM is done and runs while the
        next tile computes (tiling-AllReduce). None: one all_reduce per projection. Decode steps
        (fewer tokens than two tiles) always use one all_reduce per projection.
    overlap_mlp: with tiles, run each decoder layer's tail (o_proj, norm, MLP) tile by tile, so
        the attention's all_reduce overlaps the MLP's first GEMMs (facli.parallel.overlap).
    reduce_engine: "nccl" sums tiles with torch.distributed's all_reduce; "copy" has two ranks
        push tiles of at least 1 MiB to each other through symmetric memory with the GPUs' copy
        engines, leaving the SMs to the GEMMs, and the kernel that reads a tile sums it
        (facli.parallel.copy_engine; two peer-accessible GPUs of one host only: other ranks,
        one-tile outputs and CUDA-graph captures fall back to all_reduce).
    relay_sums: with the copy engines, tiles are summed by relay (one rank's GEMM adds its
        product onto the other's partial and sends the sum back); False: each rank receives
        the other's partials and a pair_sum kernel adds them (facli.parallel.copy_engine).
    waves: prefill a chunk of at least two tiles as two halves that take turns through each
        decoder layer, so that each half's sums run beside the other half's compute
        (facli.parallel.waves; the KV cache all on the device). A half is summed through the
        copy engines where reduce_engine is "copy" and two peer GPUs can, else by an
        asynchronous all_reduce.
    """

    tile_tokens: int | None = None
    overlap_mlp: bool = False
    reduce_engine: str = "nccl"
    relay_sums: bool = True
    waves: bool = False

    def __post_init__(self):
        if self.tile_tokens is not None and self.tile_tokens <= 0:
            raise FacliError(f"expected a tile size > 0 tokens (or none), got {self.tile_tokens}")
        if self.reduce_engine not in REDUCE_ENGINES:
            raise FacliError(f"expected a reduce engine in {', '.join(REDUCE_ENGINES)}, "
                             f"got {self.reduce_engine!r}")


@dataclass(frozen=True)
class ParallelContext:
    """rank of world_size; world_size 1 means no distributed setup at all.

    local_rank picks the GPU of this process on its host (cuda:local_rank).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    settings: TensorParallelSettings = field(default_factory=TensorParallelSettings)

    def __post_init__(self):
        assert 0 <= self.rank < self.world_size
        assert self.local_rank >= 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_writer(self) -> bool:
        """Only rank 0 prints and writes files."""
        return self.rank == 0

    def with_settings(self, settings: TensorParallelSettings) -> "ParallelContext":
        """The same rank with other collective settings (e.g. the plan's tile size)."""
        return replace(self, settings=settings)


SINGLE_PROCESS = ParallelContext()
