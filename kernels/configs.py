"""Block sizes for the attention kernels, per GPU architecture.

Two-level tiling: a program owns BLOCK_M queries (the outer block) and streams K/V through
BLOCK_N-key inner tiles, `num_stages` deep in shared memory. The outer block is as large as the
register file allows; the inner tile and the pipeline depth are what shared memory allows:
Hopper 227 KiB per block, Ampere 163 KiB (A100) / 99 KiB (consumer), Turing 64 KiB, Volta 96 KiB.
The prefill table is the portable Triton kernel's (on Hopper the model's long prefill chunks run
kernels/prefill_hopper.py instead). The Hopper rows are the ones benchmarks pick:
`benchmarks/attention.py --sweep` times the prefill configs (causal, bf16, D=128, at 16K and
64K tokens), `benchmarks/decode_sweep.py` (and `--fp8`) the decode configs, and
`benchmarks/decode_rows.py` the split counts of rows. The other architectures' rows are sized to
fit shared memory and are not timed. TMA (the copy engine) needs sm90+ and D in {64, 128, 256};
elsewhere the same sizes run with plain loads.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class PrefillConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    tma: bool = False  # K/V tiles through the Hopper copy engine (sm90+, D in {64, 128, 256})
    warp_specialize: bool = False  # Triton's producer/consumer warp split of the unmasked loop

    def __post_init__(self):
        for name in ("block_m", "block_n"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"expected {name} a power of two >= 16, got {value}")


@dataclass(frozen=True)
class DecodeConfig:
    block_n: int
    num_warps: int
    num_stages: int
    programs_per_sm: int  # split-KV target: splits * B * Hkv ~ programs_per_sm * SMs
    # More than one program per SM only where each split still streams this many tiles: bf16
    # caches are bound by bytes and short splits pay their start-up; fp8 caches by latency.
    long_split_tiles: int = 32
    # Rows that row_splits splits take at least this many splits (splits_filling_waves).
    least_row_splits: int = 1


# (compute capability major, head-dim bucket) -> prefill config. The head-dim bucket is the
# padded head dim (64, 128 or 256): 80 and 96 run in 128-wide registers.
_PREFILL = {
    (9, 64): PrefillConfig(128, 128, 8, 3, tma=True),
    (9, 128): PrefillConfig(128, 128, 8, 3, tma=True),
    (9, 256): PrefillConfig(128, 64, 8, 2, tma=True),
    (8, 64): PrefillConfig(128, 64, 4, 3),
    (8, 128): PrefillConfig(128, 64, 8, 3),
    (8, 256): PrefillConfig(64, 32, 4, 2),
    # Volta (7.0, 96 KiB) and Turing (7.5, 64 KiB): two stages of 64-key tiles fit.
    (7, 64): PrefillConfig(64, 64, 4, 2),
    (7, 128): PrefillConfig(64, 32, 4, 2),
    (7, 256): PrefillConfig(32, 32, 4, 1),
}

# (compute capability major, head-dim bucket) -> decode config. Shared memory holds num_stages
# K and V tiles: num_stages * block_n * D * 4 bytes in 16-bit caches. On Hopper one program per
# SM streams 128-key tiles with 8 warps, keeping the most bytes in flight (the pick of
# benchmarks/decode_sweep.py at 32K and 256K keys, 8 and 32 KV heads); D=256 halves the tile to
# fit 227 KiB.
_DECODE = {
    (9, 64): DecodeConfig(block_n=128, num_warps=8, num_stages=3, programs_per_sm=1),
    (9, 128): DecodeConfig(block_n=128, num_warps=8, num_stages=3, programs_per_sm=1),
    (9, 256): DecodeConfig(block_n=64, num_warps=8, num_stages=3, programs_per_sm=1),
    (8, 64): DecodeConfig(block_n=64, num_warps=4, num_stages=3, programs_per_sm=4),
    (8, 128): DecodeConfig(block_n=64, num_warps=4, num_stages=3, programs_per_sm=4),
    (8, 256): DecodeConfig(block_n=32, num_warps=4, num_stages=3, programs_per_sm=4),
    (7, 64): DecodeConfig(block_n=32, num_warps=4, num_stages=2, programs_per_sm=4),
    (7, 128): DecodeConfig(block_n=32, num_warps=4, num_stages=2, programs_per_sm=4),
    (7, 256): DecodeConfig(block_n=16, num_warps=4, num_stages=2, programs_per_sm=4),
}

# fp8 caches on Hopper: the loop converts every byte, and is bound by instruction latency rather
# than by bytes, so two 4-warp programs share an SM, with 64-key tiles and splits down to 4 tiles
# (the pick of benchmarks/decode_sweep.py --fp8). D=256 halves the tile so that two programs
# fit. Rows of different lengths leave the last programs of a wave running alone; at least 4
# splits per row shorten that tail (benchmarks/decode_rows.py --caches fp8).
_DECODE_FP8 = {
    (9, 64): DecodeConfig(block_n=64, num_warps=4, num_stages=3, programs_per_sm=2,
                          long_split_tiles=4, least_row_splits=4),
    (9, 128): DecodeConfig(block_n=64, num_warps=4, num_stages=3, programs_per_sm=2,
                           long_split_tiles=4, least_row_splits=4),
    (9, 256): DecodeConfig(block_n=32, num_warps=4, num_stages=3, programs_per_sm=2,
                           long_split_tiles=4, least_row_splits=4),
}

# Rows of a batch: (row, KV head) programs beyond half a wave of programs_per_sm * SMs, or fewer
# that one wave's even share would leave part-filled, take the fewest splits (up to ROW_SPLITS)
# whose last wave is at least WAVE_FILL full: a part-filled last wave takes as long as a full
# one. benchmarks/decode_rows.py times every split count against this choice.
WAVE_FILL = 0.95
ROW_SPLITS = 8


def filled_share(programs: int, slots: int) -> float:
    """Share of the waves of `slots` programs each that `programs` programs fill."""
    return programs / (-(-programs // slots) * slots)


def row_splits(cfg: DecodeConfig, programs: int, sms: int, most: int) -> int | None:
    """Splits for (row, KV head) programs whose waves one even share per slot would leave
    part-filled: splits_filling_waves from cfg.least_row_splits. None where one wave's even share
    (decode.choose_num_splits' one-sequence rule) fills at least as well, or WAVE_FILL.
    3 fp8 rows of 32 heads on 132 SMs of two slots each: one wave's even share, 2 splits, fills
    73% of the wave; 8 splits fill 97% of three."""
    slots = cfg.programs_per_sm * sms
    if 2 * programs > slots:
        return splits_filling_waves(programs, slots, most, cfg.least_row_splits)
    one_wave = max(1, min(most, slots // programs))
    one_wave_fill = filled_share(programs * one_wave, slots)
    if one_wave_fill >= WAVE_FILL:
        return None
    splits = splits_filling_waves(programs, slots, most, cfg.least_row_splits)
    return splits if filled_share(programs * splits, slots) > one_wave_fill else None


def splits_filling_waves(programs: int, slots: int, most: int, least: int = 1) -> int:
    """The fewest splits from `least`, up to min(most, ROW_SPLITS), that fill the last wave to
    WAVE_FILL, else the ones that fill it most. 7 rows of 32 KV heads on 132 slots: one split
    fills 70% of the second wave, 4 splits fill 97% of 7 waves."""
    top = max(1, min(most, ROW_SPLITS))
    best, best_fill = 1, 0.0
    for splits in range(min(least, top), top + 1):
        fill = filled_share(programs * splits, slots)
        if fill >= WAVE_FILL:
            return splits
        if fill > best_fill:
            best, best_fill = splits, fill
    return best


# Causal prefill with short queries (chunks of a few hundred tokens, or the interpreter) does
# not need the large outer block; used below this many queries.
SMALL_QUERIES = 64
_SMALL = PrefillConfig(32, 32, 4, 2)


def _arch_major(device) -> int:
    import torch

    if device is None or device.type != "cuda":
        return 9
    major, _ = torch.cuda.get_device_capability(device)
    return min(max(major, 7), 9)


def head_dim_bucket(head_dim: int) -> int:
    for bucket in (64, 128, 256):
        if head_dim <= bucket:
            return bucket
    raise ValueError(f"expected head dim <= 256, got {head_dim}")


def prefill_config(device, head_dim: int, q_len: int, *, causal: bool, dtype) -> PrefillConfig:
    """The prefill block sizes for this device, head dim, causality and dtype."""
    del causal, dtype  # the table is swept for causal bf16 only (benchmarks/attention.py --sweep)
    if device is None or device.type != "cuda" or q_len <= SMALL_QUERIES:
        return _SMALL
    return _PREFILL[(_arch_major(device), head_dim_bucket(head_dim))]


def decode_config(device, head_dim: int, *, fp8: bool = False) -> DecodeConfig:
    """The decode block sizes for this device, head dim and cache dtype (fp8: e4m3 K/V)."""
    if device is None or device.type != "cuda":
        return DecodeConfig(block_n=32, num_warps=4, num_stages=1, programs_per_sm=1)
    return arch_decode_config(_arch_major(device), head_dim, fp8=fp8)


def arch_decode_config(major: int, head_dim: int, *, fp8: bool = False) -> DecodeConfig:
    """decode_config for a GPU of this compute capability major, without one at hand."""
    key = (min(max(major, 7), 9), head_dim_bucket(head_dim))
    if fp8 and key in _DECODE_FP8:
        return _DECODE_FP8[key]
    return _DECODE[key]


def num_sms(device) -> int:
    import torch

    if device is None or device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count
