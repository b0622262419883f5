"""Run rules that the planner prices and the runtime follows, kept in one place so both agree.

How a tensor-parallel prefill sums its row-parallel outputs (copy engines between two GPUs, two
waves with more, else one all_reduce per projection) and in tiles of how many tokens, and how
large the offloaded KV store's GPU buffers are; which KV store holds a plan's cache, and when its
decode steps run as CUDA-graph replays and its sequences decode together as rows.
facli.planner.memory and facli.planner.time_model price these choices, facli.run.placement turns a
plan into run settings, and facli.parallel and facli.offload carry them out. A leaf module: it
imports nothing of the project.
docs/calibration.md lists the measured constants and the benchmarks/ scripts that refit them.
"""

# Tensor-parallel ranks that sum prefill tiles with the copy engines (facli.parallel.copy_engine).
COPY_ENGINE_RANKS = 2
# Symmetric inboxes per rank for those sums, each a whole projection output [chunk, hidden],
# used by alternating row-parallel projections.
COPY_ENGINE_INBOXES = 2
# Tokens per copy-engine prefill tile (benchmarks/tensor_parallel.py --devices 2 --tile).
COPY_ENGINE_TILE_TOKENS = 4096
# Tokens per tile with more GPU ranks (NCCL): a chunk that holds two runs in two waves
# (facli.parallel.waves; benchmarks/tensor_parallel.py --devices 4).
WAVES_TILE_TOKENS = 8192

# Offloaded KV store (facli.offload.kv_store), on the GPU:
STAGING_SLOTS = 2  # slots, each one layer's K and V for the whole capacity in the model dtype
FP8_RING_ROWS = 8192  # rows of the fp8 ring that host rows are dequantized through
# Rows of a GPU-resident fp8 prefix that prefill dequantizes per tile (TTFT of `facli bench
# --kv-dtype fp8` at long contexts against its peak memory).
FP8_PREFILL_TILE_ROWS = 65536


def splits_into_tiles(tokens, tile):
    """Whether a prefill chunk of `tokens` (an int or an array) is cut into AllReduce tiles of
    `tile` tokens: only where it holds two."""
    return tokens >= 2 * tile


def tile_bounds(count: int, tile: int | None) -> list[tuple[int, int]]:
    """Token ranges of the AllReduce tiles for `count` tokens: one range unless two tiles fit."""
    if tile is None or not splits_into_tiles(count, tile):
        return [(0, count)]
    return [(start, min(start + tile, count)) for start in range(0, count, tile)]


def sums_with_copy_engines(tp: int, on_gpu: bool) -> bool:
    """Whether tiled prefill sums go through the copy engines (else through all_reduce)."""
    return tp == COPY_ENGINE_RANKS and on_gpu


def prefills_in_waves(tp: int, on_gpu: bool, offloaded_store: bool) -> bool:
    """Whether a tiled prefill chunk runs in two waves (facli.parallel.waves): more GPU ranks
    than the copy engines serve, with the KV cache all on the GPUs (not the offloaded store)."""
    return tp > 1 and on_gpu and not sums_with_copy_engines(tp, on_gpu) and not offloaded_store


def prefill_tile(tp: int, chunk: int, on_gpu: bool) -> int | None:
    """Tokens per prefill AllReduce tile, or None where prefill sums with one all_reduce per
    projection: the copy engines' tile between two GPUs; with more GPU ranks, the tile that
    marks a chunk long enough to run in two waves."""
    if tp == 1 or not on_gpu:
        return None
    tile = COPY_ENGINE_TILE_TOKENS if sums_with_copy_engines(tp, on_gpu) else WAVES_TILE_TOKENS
    return tile if splits_into_tiles(chunk, tile) else None


def packed_slot_rows(capacity: int, host_layers: int) -> int:
    """Rows of each host layer that the staging slots keep at once, every host layer beside the
    others (the store's packed slots), while no host layer holds more: the whole capacity for
    one or two host layers, half of it for three or four, a quarter for up to eight."""
    if host_layers == 0:
        return 0
    return capacity // -(-host_layers // STAGING_SLOTS)


# Which KV store a plan's cache lives in (facli.offload.build) and how its decode steps run.
# The decode kernel reads an fp8 cache directly from compute capability 8.9 (Ada, Hopper) on: its
# float16 path converts e4m3 with the hardware's cvt.rn.f16x2.e4m3x2 (sm89+); only Hopper is
# measured. Older GPUs attend over dequantized tiles.
READS_FP8_FROM = (8, 9)
# Prefill over an fp8 cache can read e4m3 in the kernel itself on Hopper (sm90: the Gluon kernel's
# producer warps dequantize tiles in shared memory, facli.kernels.prefill_hopper_fp8). Off until
# that kernel has passed its GPU tests (tests/kernels/test_kernels_prefill_hopper.py) on an sm90
# GPU: until then Hopper, like other GPUs, dequantizes FP8_PREFILL_TILE_ROWS-row tiles first.
HOPPER_PREFILL_READS_FP8 = False
PREFILL_READS_FP8_MAJOR = 9


def uses_offloaded_store(decode_mode: str, fp8_kv: bool) -> bool:
    """Whether the runtime keeps this placement's KV in the offloaded store (host layers, or an
    fp8 cache) rather than the all-GPU cache of the model dtype."""
    return decode_mode != "resident" or fp8_kv


def decodes_eagerly(fp8_kv: bool, gpu_reads_fp8: bool) -> bool:
    """Whether decode steps run wholly eagerly rather than as CUDA-graph replays: with an fp8
    cache on GPUs whose decode kernel cannot read e4m3 directly (before sm89). Elsewhere only
    the KV store of host layers runs eagerly, between graphs (facli.run.graphs)."""
    return fp8_kv and not gpu_reads_fp8


def gpus_read_fp8(gpus) -> bool:
    """Whether the decode kernel reads an fp8 cache directly on all these GPUs (hardware specs)."""
    return all(tuple(g.compute_capability) >= READS_FP8_FROM for g in gpus)


def gpus_prefill_fp8(gpus) -> bool:
    """Whether prefill reads an fp8 cache in the kernel, with no dequantized tiles, on all these
    GPUs (hardware specs)."""
    return (HOPPER_PREFILL_READS_FP8 and bool(gpus)
            and all(g.compute_capability[0] == PREFILL_READS_FP8_MAJOR for g in gpus))


def holds_rows(decode_mode: str, fp8_kv: bool, gpu_reads_fp8: bool) -> bool:
    """Whether this placement's cache can hold several sequences decoded together, as rows
    stepped by one graph: every layer's KV on the devices and, for an fp8 cache, a decode
    kernel that reads e4m3 directly (a row's decode step takes its position as a tensor)."""
    return decode_mode == "resident" and not decodes_eagerly(fp8_kv, gpu_reads_fp8)
