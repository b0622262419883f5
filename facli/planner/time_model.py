"""Predicted prefill and decode time of one placement, from the hardware spec's rates.

The rates in the hardware recipes are achievable figures; every other guess about GPUs is a
constant below, with its meaning and unit and what measures it (docs/calibration.md has each
constant's fit and how to refit it). CPU-only plans are timed by planner.cpu_time instead; where
a term is unknown (unknown_time), the figures only rank candidates and the plan reports no time.
"""

from dataclasses import dataclass

import numpy as np

from facli.kernels.configs import ROW_SPLITS, arch_decode_config, filled_share, row_splits
from facli.models.config import ModelConfig
from facli.planner.cpu_time import cpu_decode_breakdown, cpu_prefill_breakdown, unknown_cpu_time
from facli.planner.hardware import HardwareSpec
from facli.planner.memory import activation_bytes, kv_layer_bytes, weight_bytes
from facli.planner.policy import (
    decodes_eagerly,
    gpus_prefill_fp8,
    gpus_read_fp8,
    packed_slot_rows,
    prefill_tile,
    prefills_in_waves,
    splits_into_tiles,
    sums_with_copy_engines,
    uses_offloaded_store,
)

# --- calibration: meaning and unit, then what refits it (docs/calibration.md) ---
# Tokens at which a GEMM reaches half of MATMUL_EFFICIENCY. `facli bench` TTFT at short depths.
MATMUL_HALF_EFFICIENCY_TOKENS = 128
# The model's GEMMs over matmul_tflops (ratio). `facli bench --synthetic llama-7b` TTFT.
MATMUL_EFFICIENCY = 0.89
# Triton prefill attention TFLOP/s over matmul_tflops (ratio). benchmarks/attention.py.
ATTENTION_EFFICIENCY = 0.63
# The same for the Gluon prefill kernel on Hopper (ratio). benchmarks/attention.py.
HOPPER_ATTENTION_EFFICIENCY = 0.77
# Passes over each activation: fused kernels read it once, write it once. benchmarks/elementwise.py.
ELEMENTWISE_PASSES = 2
# Seconds per layer per prefill step: kernel launches. `facli bench` TTFT at short depths.
LAYER_OVERHEAD_S = 30e-6
# Seconds per layer per graphed decode step, beyond its bytes. `facli bench` decode at 8K-128K.
DECODE_LAYER_OVERHEAD_S = 27e-6
# Rows' weight read rate (cuBLAS GEMMs) over one row's kernel, in us per layer. benchmarks/gemv.py.
ROWS_WEIGHT_READ_SHARE = 104 / 117
# Decode's read rate over hbm_gbps, a copy's rate (ratio). `facli bench` decode at 8K-256K.
DECODE_READ_RATE = 1.08
# Decode kernel's rate over an fp8 cache, share of bf16's. `facli bench --kv-dtype fp8` decode.
FP8_DECODE_READ_SHARE = 0.57
# The same for rows in full waves. `facli bench --kv-dtype fp8 --batch N`.
FP8_ROWS_DECODE_READ_SHARE = 0.60
# Host seconds per layer of a wholly eager decode step. `facli generate --eager --kv-dtype fp8`.
EAGER_STORE_LAYER_HOST_S = 1.5e-3
# Seconds per host layer per step: its KV store between graphs. benchmarks/offloaded_decode.py.
HOST_LAYER_EAGER_S = 30e-6
# Prefill attention over an fp8 prefix, times bf16's (factor): through dequantized tiles, and
# where the kernel reads e4m3 itself (Hopper, policy.HOPPER_PREFILL_READS_FP8). `facli bench
# --kv-dtype fp8` TTFT. The second is not fitted yet: its consumers run the bf16 kernel's work
# over the same bf16 values, so it starts at 1.
FP8_PREFILL_ATTENTION_FACTOR = 1.1
FP8_KERNEL_PREFILL_ATTENTION_FACTOR = 1.0
# Share of the prefill sums that copy-engine tiles hide (two GPUs). benchmarks/tensor_parallel.py.
COPY_ENGINE_HIDDEN = 0.5
# The same for two-wave prefill with NCCL (more GPUs). benchmarks/tensor_parallel.py --modes waves.
NCCL_WAVES_HIDDEN = 0.4
# The same for NCCL tiles where waves do not apply. benchmarks/tensor_parallel.py --modes tiled.
NCCL_TILING_HIDDEN = 0.1
# Seconds per host layer of cpu/split decode: GPU-CPU hand-offs. benchmarks/offloaded_decode.py.
CPU_ATTENTION_SYNC_S = 170e-6
# Seconds per host layer of split decode: slot wait and merge. benchmarks/offloaded_decode.py.
SPLIT_LAYER_S = 0.6e-3
# CPU attention over fp8 rows, share of cpu_attention_gbps. benchmarks/cpu_attention.py.
CPU_FP8_ATTENTION_SHARE = 0.04


@dataclass(frozen=True)
class Layout:
    """What the time model needs to know about one candidate placement."""

    config: ModelConfig
    ctx: int
    batch: int
    tp: int
    chunk: int
    tile_tokens: int
    host_layers: int
    decode_mode: str  # "resident", "prefetch", "cpu" or "split"
    weight_dtype_bytes: int
    kv_dtype_bytes: int
    on_cpu: bool = False  # a CPU-only plan: everything in host memory, computed by the CPU
    capacity: int = 0  # positions the KV store holds, when more than ctx (a shorter prompt)


def packs_slots(layout: Layout) -> bool:
    """Whether the staging slots keep every host layer's rows at `ctx` positions (the offloaded
    store's packed slots: always with one or two host layers), so no host row crosses PCIe
    again and no mode attends on the CPU."""
    if not layout.host_layers or layout.on_cpu:
        return False
    return layout.ctx <= _packed_rows(layout)


def _packed_rows(layout: Layout) -> int:
    """Positions of each host layer the staging slots keep while they keep every host layer."""
    return packed_slot_rows(layout.capacity or layout.ctx, layout.host_layers)


def unknown_time(hw: HardwareSpec, layout: Layout) -> str | None:
    """Why this layout's time cannot be predicted (a term of it is unknown), or None when it can.
    The figures prefill_breakdown and decode_breakdown give for it then only rank candidates."""
    if not layout.on_cpu:
        return None
    return unknown_cpu_time(hw.cpu, layout.tp, layout.weight_dtype_bytes, layout.kv_dtype_bytes)


def _rates(hw: HardwareSpec, layout: Layout) -> tuple[float, float]:
    """(matmul FLOP/s, memory bytes/s) of one rank's GPU."""
    gpus = hw.devices[: layout.tp]
    return min(g.matmul_tflops for g in gpus) * 1e12, min(g.hbm_gbps for g in gpus) * 1e9


def _gpus_read_fp8(hw: HardwareSpec, layout: Layout) -> bool:
    return gpus_read_fp8(hw.devices[: layout.tp])


def _attention_efficiency(hw: HardwareSpec, layout: Layout) -> float:
    """Prefill attention's share of the matmul rate, by the kernel the ranks' GPUs run."""
    if all(g.compute_capability[0] == 9 for g in hw.devices[: layout.tp]):
        return HOPPER_ATTENTION_EFFICIENCY
    return ATTENTION_EFFICIENCY


def _linear_params(config: ModelConfig, tp: int) -> float:
    """Matmul weights a token passes through on one rank (lm_head excluded)."""
    h, d = config.hidden_size, config.head_dim
    q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * config.intermediate_size
    return config.num_hidden_layers * per_layer / tp


def _allreduce_seconds(bytes_per_call: np.ndarray, calls: int, tiles: np.ndarray,
                       hw: HardwareSpec, tp: int) -> np.ndarray:
    ring = 2 * (tp - 1) / tp * bytes_per_call / (hw.inter_gpu_gbps * 1e9)
    return calls * (tiles * hw.allreduce_latency_us * 1e-6 + ring)


def _chunks(ctx: int, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    starts = np.arange(0, ctx, chunk, dtype=np.float64)
    sizes = np.minimum(chunk, ctx - starts)
    return starts, sizes


def prefill_breakdown(hw: HardwareSpec, layout: Layout) -> dict[str, float]:
    """Seconds of the prefill of `ctx` tokens in chunks, with the terms that make it up; for a
    batch, its sequences one after another (as the runtime prefills the rows of a batch)."""
    if layout.on_cpu:
        return cpu_prefill_breakdown(hw.cpu, layout.config, layout.ctx, layout.batch,
                                     layout.chunk, layout.tp)
    c, t = layout.config, layout.tp
    matmul_rate, mem_rate = _rates(hw, layout)
    starts, sizes = _chunks(layout.ctx, layout.chunk)
    tokens = sizes
    efficiency = tokens / (tokens + MATMUL_HALF_EFFICIENCY_TOKENS)
    flops = 2 * _linear_params(c, t) * tokens
    weights = weight_bytes(c, layout.weight_dtype_bytes, t)
    gemm = np.maximum(flops / (matmul_rate * MATMUL_EFFICIENCY * efficiency), weights / mem_rate)
    pairs = sizes * starts + sizes * (sizes + 1) / 2
    attn_flops = 4 * c.head_dim * (c.num_attention_heads / t) * c.num_hidden_layers * pairs
    attention = attn_flops / (matmul_rate * _attention_efficiency(hw, layout))
    if layout.kv_dtype_bytes == 1:
        reads_e4m3 = gpus_prefill_fp8(hw.devices[: layout.tp])
        attention = attention * (FP8_KERNEL_PREFILL_ATTENTION_FACTOR if reads_e4m3
                                 else FP8_PREFILL_ATTENTION_FACTOR)
    per_chunk_act = activation_bytes(c, layout.chunk, 1, layout.weight_dtype_bytes, t)
    elementwise = (ELEMENTWISE_PASSES * per_chunk_act * c.num_hidden_layers / mem_rate
                   * sizes / layout.chunk)
    overhead = np.full_like(sizes, c.num_hidden_layers * LAYER_OVERHEAD_S)
    compute = gemm + attention + elementwise + overhead
    comm = np.zeros_like(sizes)
    if t > 1:
        single = _allreduce_seconds(tokens * c.hidden_size * layout.weight_dtype_bytes,
                                    2 * c.num_hidden_layers, np.ones_like(tokens), hw, t)
        tiled = splits_into_tiles(tokens, layout.tile_tokens)
        comm = np.where(tiled, (1 - _hidden_share(layout)) * single, single)
    transfer = np.zeros_like(sizes)
    if layout.host_layers:
        per_token_layer = kv_layer_bytes(c, 1, 1, layout.kv_dtype_bytes, t)
        # Each host layer's prefix is reloaded for each chunk once the slots no longer keep
        # them all (packed_slot_rows).
        packed = starts + sizes <= _packed_rows(layout)
        reload = np.where(packed, 0.0, layout.host_layers * per_token_layer * starts)
        write_back = layout.host_layers * per_token_layer * sizes
        link = np.maximum(reload, write_back) / (hw.host_device_gbps * 1e9)
        dram = (reload + write_back) * t / (hw.cpu_memory_gbps * 1e9)
        transfer = np.maximum(link, dram)
    busy = compute + comm
    lm_head = 2 * c.vocab_size * c.hidden_size / t / matmul_rate
    one_sequence = {
        "prefill_s": np.maximum(busy, transfer).sum() + lm_head,
        "prefill_matmul_s": gemm.sum() + lm_head,
        "prefill_attention_s": attention.sum(),
        "prefill_elementwise_and_overhead_s": (elementwise + overhead).sum(),
        "prefill_comm_exposed_s": comm.sum(),
        "prefill_host_transfer_exposed_s": np.maximum(transfer - busy, 0).sum(),
    }
    return {name: float(seconds * layout.batch) for name, seconds in one_sequence.items()}


def _device_decode_seconds(hw: HardwareSpec, layout: Layout, staged_layers: float) -> float:
    """The GPU's share of a decode step: weights, GPU-resident KV and `staged_layers` layers
    read from staging slots (model dtype), plus per-layer overhead."""
    c, t, b = layout.config, layout.tp, layout.batch
    _, mem_rate = _rates(hw, layout)
    layers = c.num_hidden_layers
    layer_kv = kv_layer_bytes(c, layout.ctx, b, layout.kv_dtype_bytes, t)
    weights = weight_bytes(c, layout.weight_dtype_bytes, t)
    slot_kv = kv_layer_bytes(c, layout.ctx, b, layout.weight_dtype_bytes, t)
    # GPU-resident fp8 rows go through the decode kernel's e4m3 path, at its own rate.
    gpu_kv = (layers - layout.host_layers) * layer_kv
    rows = b > 1
    if layout.kv_dtype_bytes == 1:
        gpu_kv /= FP8_ROWS_DECODE_READ_SHARE if rows else FP8_DECODE_READ_SHARE
    if rows:
        weights /= ROWS_WEIGHT_READ_SHARE
        gpu_kv /= decode_wave_fill(hw, layout)
    device = (weights + gpu_kv + staged_layers * slot_kv) / (mem_rate * DECODE_READ_RATE)
    return device + layers * DECODE_LAYER_OVERHEAD_S


def decode_wave_fill(hw: HardwareSpec, layout: Layout) -> float:
    """Share of the decode kernel's waves that its rows' programs fill at the kernel's split
    count (1 when one sequence's splits fill one wave, or when the SM count is unknown). With
    rows, the (sequence, KV head, split) programs run in waves of programs_per_sm per SM, and
    the last may run part-filled: the cache reads stretch by the filled share. The contexts
    planned are long enough for every split count the rows may take."""
    gpu = hw.devices[0]
    if not gpu.sms:
        return 1.0
    c = layout.config
    cfg = arch_decode_config(gpu.compute_capability[0], c.head_dim, fp8=layout.kv_dtype_bytes == 1)
    programs = layout.batch * max(1, c.num_key_value_heads // layout.tp)
    splits = row_splits(cfg, programs, gpu.sms, ROW_SPLITS)
    return 1.0 if splits is None else filled_share(programs * splits, gpu.sms * cfg.programs_per_sm)


def _concurrent_host_rates(hw: HardwareSpec, layout: Layout) -> tuple[float, float]:
    """(PCIe bytes/s per GPU, CPU attention bytes/s) while both read host memory at once: their
    sum is capped by the host's memory bandwidth, both scaled by the same factor
    (benchmarks/offload.py measures them at once)."""
    pcie = hw.host_device_gbps * 1e9
    cpu = _cpu_attention_rate(hw.cpu_attention_gbps * 1e9, layout)
    scale = min(1.0, hw.cpu_memory_gbps * 1e9 / (pcie * layout.tp + cpu))
    return pcie * scale, cpu * scale


def _cpu_attention_rate(rate: float, layout: Layout) -> float:
    """Cache bytes per second that CPU attention reads, from the bf16 rate `rate`."""
    return rate * CPU_FP8_ATTENTION_SHARE if layout.kv_dtype_bytes == 1 else rate


def split_cpu_share(hw: HardwareSpec, layout: Layout) -> float:
    """Share of each host layer's rows that "split" decode leaves to the CPU. Per host layer, the
    GPU waits for the CPU's part, and the next host layer's PCIe part streams meanwhile (beside
    that wait and the GPU layers in between): the share makes the two equally long."""
    if layout.decode_mode != "split" or packs_slots(layout):
        return 0.0
    layer_kv = kv_layer_bytes(layout.config, layout.ctx, layout.batch, layout.kv_dtype_bytes,
                              layout.tp)
    pcie, cpu = _concurrent_host_rates(hw, layout)
    by_pcie, by_cpu = layer_kv / pcie, layer_kv * layout.tp / cpu  # one layer, all of it
    without_slots = _device_decode_seconds(hw, layout, 0)
    from_slot = _device_decode_seconds(hw, layout, 1) - without_slots  # one layer, all of it
    between = (without_slots / layout.host_layers + HOST_LAYER_EAGER_S + CPU_ATTENTION_SYNC_S
               + SPLIT_LAYER_S)
    # between + (1 - share) * from_slot + share * by_cpu == (1 - share) * by_pcie
    share = (by_pcie - from_slot - between) / (by_pcie - from_slot + by_cpu)
    return min(1.0, max(0.0, share))


def decode_breakdown(hw: HardwareSpec, layout: Layout) -> dict[str, float]:
    """Seconds of one decode step with `ctx` positions cached, and its terms."""
    if layout.on_cpu:
        return cpu_decode_breakdown(hw.cpu, layout.config, layout.ctx, layout.batch, layout.tp)
    c, t, b = layout.config, layout.tp, layout.batch
    layers = c.num_hidden_layers
    layer_kv = kv_layer_bytes(c, layout.ctx, b, layout.kv_dtype_bytes, t)
    mode = "packed" if packs_slots(layout) else layout.decode_mode
    cpu_share = split_cpu_share(hw, layout)
    # Host layers in prefetch (split) mode are read (in part) from their staging slot.
    staged = {"packed": 1.0, "prefetch": 1.0, "split": 1.0 - cpu_share}.get(mode, 0.0)
    device = (_device_decode_seconds(hw, layout, staged * layout.host_layers)
              + layout.host_layers * HOST_LAYER_EAGER_S)
    comm = 0.0
    if t > 1:
        one = np.array([b * c.hidden_size * layout.weight_dtype_bytes], dtype=np.float64)
        comm = float(_allreduce_seconds(one, 2 * layers, np.ones(1), hw, t)[0])
    host_rank = layout.host_layers * layer_kv
    host_total = host_rank * t
    host = 0.0
    if mode == "prefetch":
        # Every host layer streams in per token, overlapped with the other layers' compute.
        host = max(host_rank / (hw.host_device_gbps * 1e9), host_total / (hw.cpu_memory_gbps * 1e9))
        step = max(device, host) + comm
    elif mode == "cpu" and layout.host_layers:
        # The next layer needs this layer's output: the GPU waits for the CPU's part.
        host = host_total / _cpu_attention_rate(hw.cpu_attention_gbps * 1e9, layout)
        host += layout.host_layers * CPU_ATTENTION_SYNC_S
        step = device + host + comm
    elif mode == "split" and layout.host_layers:
        # The GPU waits for the CPU's parts; the PCIe parts stream beside them and the GPU work.
        pcie_rate, cpu_rate = _concurrent_host_rates(hw, layout)
        by_cpu = (cpu_share * host_total / cpu_rate
                  + layout.host_layers * (CPU_ATTENTION_SYNC_S + SPLIT_LAYER_S))
        by_pcie = (1 - cpu_share) * host_rank / pcie_rate
        host = max(by_cpu, by_pcie)
        step = max(device + by_cpu, by_pcie) + comm
    else:
        step = device + comm
    if decodes_eagerly(layout.kv_dtype_bytes == 1, _gpus_read_fp8(hw, layout)):
        step = max(step, layers * EAGER_STORE_LAYER_HOST_S)
    return {
        "decode_step_s": step,
        "decode_device_s": device,
        "decode_host_kv_s": host,
        "decode_comm_s": comm,
        "decode_host_cpu_share": cpu_share,
    }


def _hidden_share(layout: Layout) -> float:
    """Share of the per-projection all_reduce time that a tiled chunk hides on GPUs."""
    if sums_with_copy_engines(layout.tp, on_gpu=True):
        return COPY_ENGINE_HIDDEN
    offloaded = uses_offloaded_store(layout.decode_mode, layout.kv_dtype_bytes == 1)
    if prefills_in_waves(layout.tp, on_gpu=True, offloaded_store=offloaded):
        return NCCL_WAVES_HIDDEN
    return NCCL_TILING_HIDDEN


def choose_allreduce_tile(hw: HardwareSpec, layout: Layout) -> int:
    """The tiling-AllReduce tile (tokens): policy.prefill_tile once a chunk holds two,
    else the chunk (one all_reduce per projection)."""
    return prefill_tile(layout.tp, layout.chunk, on_gpu=not layout.on_cpu) or layout.chunk
