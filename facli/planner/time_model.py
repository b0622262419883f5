"""Predicted prefill and decode time of one placement, from the hardware spec's rates.

Every guess about GPUs lives in the constants below; calibrate them against `facli bench`
measurements. Rates in the hardware recipes are already achievable figures (measured or
datasheet scaled). CPU-only plans are timed by planner.cpu_time instead, whose constants
benchmarks/cpu_calibration.py fits to CPU runs; where a term is unknown (unknown_time), the
figures only rank candidates and the plan reports no time.
"""

from dataclasses import dataclass

import numpy as np

from facli.config import ModelConfig
from facli.kernels.configs import ROW_SPLITS, arch_decode_config, filled_share, row_splits
from facli.planner.cpu_time import cpu_decode_breakdown, cpu_prefill_breakdown, unknown_cpu_time
from facli.planner.hardware import HardwareSpec
from facli.planner.memory import activation_bytes, kv_layer_bytes, weight_bytes
from facli.planner.plan import decodes_eagerly, gpus_read_fp8, uses_offloaded_store
from facli.planner.policy import (
    packed_slot_rows,
    prefill_tile,
    prefills_in_waves,
    splits_into_tiles,
    sums_with_copy_engines,
)

# --- calibration ---
# Fitted to `facli bench --synthetic llama-7b` on one and on two H200s with the fused
# elementwise kernels (docs/benchmarks.md, "End to end"): predicted TTFT within 3% of measured
# from 8K to 256K after this fit, decode within 9%. DECODE_READ_RATE came later, over 24 depths
# on 1, 2 and 4 H200s: decode within 10%, 4% root mean square.
MATMUL_HALF_EFFICIENCY_TOKENS = 128  # GEMM efficiency = tokens / (tokens + this)
MATMUL_EFFICIENCY = 0.89  # cuBLAS bf16 GEMMs of the model's shapes against the 8192^3 ceiling
# Attention TFLOP/s as a share of the matmul rate: facli's Triton prefill kernel measured
# 486-518 TFLOP/s against a 760-798 TFLOP/s matmul ceiling on the H200 (0.62-0.66); on Hopper
# the Gluon kernel (kernels/prefill_hopper.py) 583-630 against 788 at 16K-256K (0.74-0.80).
ATTENTION_EFFICIENCY = 0.63
HOPPER_ATTENTION_EFFICIENCY = 0.77
ELEMENTWISE_PASSES = 2  # fused norms, RoPE, SiLU and residual adds: each activation read once, written once
LAYER_OVERHEAD_S = 30e-6  # per layer per prefill step: kernel launches in eager mode
# Per layer per decode step, beyond its bytes: the small kernels of a layer (norms, RoPE,
# split-KV merge, GEMVs below bandwidth) inside one CUDA graph; fitted over 8K-128K at 55 us,
# then 12 us less per layer for facli's matrix-vector kernel (facli.kernels.gemv: 12.1 us per
# Llama-7B layer faster than cuBLAS on an H200). With it, 8K and 32K decode measured 188.0 and
# 122.0 tok/s against 188.9 and 122.9 predicted (docs/benchmarks.md, 000001e).
DECODE_LAYER_OVERHEAD_S = 43e-6
# With rows (batch > 1) the projections run as cuBLAS GEMMs, not facli's one-row matrix-vector
# kernel: 117 us per Llama-7B layer against 104 on an H200 (docs/benchmarks.md, 000001e), so the
# weights stream at this share of the one-row rate.
ROWS_WEIGHT_READ_SHARE = 104 / 117
# Decode's reads (the split-KV attention kernel, cuBLAS's GEMVs) stream faster than the spec's
# achievable rate, which a copy measures: on an H200 facli's decode kernel read 4.41-4.60 TB/s
# where torch.sum read 4.11-4.15 in the same calls. Fitted over the runs on 1, 2 and 4 H200s
# since the last refit (docs/benchmarks.md, "Planner predictions after fitting").
DECODE_READ_RATE = 1.08
# The decode kernel reads an fp8 cache (e4m3 values, a float32 scale per token and head) at this
# share of the bf16 path's rate: it converts every byte in registers and is bound by instruction
# latency, not by memory. Fitted to `facli bench --synthetic llama-7b --kv-dtype fp8` at 32K,
# 128K and 256K on one H200 with the scales stored by head (commit 9a496df,
# docs/benchmarks.md, "fp8 scales stored by head"): within 1.1% at each depth.
FP8_DECODE_READ_SHARE = 0.57
# Rows of an fp8 cache, in waves their splits fill, read at this share instead: the kernel read
# 2.65-2.71 TB/s over 7-24 full rows at 32K where the bf16 path read 4.43-4.60
# (benchmarks/decode_rows.py, scales stored by head). Fitted to `facli bench --kv-dtype fp8
# --batch 14` at 32K on one H200 (commit 9a496df): within 0.1%.
FP8_ROWS_DECODE_READ_SHARE = 0.60
# Per layer per decode step of a wholly eager decode (an fp8 cache the GPU cannot read
# directly): the host's Python and launches for the layer. Fitted to one run (fp8 KV, all layers
# on one H200, 256K, run eagerly before that layout replayed graphs: 48.3 ms per step); the host
# then sets the pace whenever the GPU's share of a layer is shorter.
EAGER_STORE_LAYER_HOST_S = 1.5e-3
# Per host layer per decode step, beyond its bytes: the KV store's part runs eagerly between two
# CUDA graphs (facli.graphs). On one H200, Llama-7B in a cache planned for 256K (4 host layers,
# prefetch) decoded a 1K prompt in 4.96 ms per step against 4.85 predicted without it
# (benchmarks/offloaded_decode.py at 372e3b1, docs/benchmarks.md).
HOST_LAYER_EAGER_S = 30e-6
# fp8 prefill attends over the cached prefix in dequantized tiles of FP8_PREFILL_TILE_ROWS, merged
# by log-sum-exp (offload.kv_store): attention time times this. Fitted to one H200 at 50688fe
# with 64K-row tiles: TTFT 10.79 / 37.93 s predicted against 10.98 / 37.35 s measured at 128K /
# 256K (docs/benchmarks.md).
FP8_PREFILL_ATTENTION_FACTOR = 1.1
# Share of one-all_reduce-per-projection communication that tiling-AllReduce hides with the copy
# engines (facli.parallel.copy_engine), tiles of COPY_ENGINE_TILE_TOKENS: with relayed sums 47% at
# 32K and 51% at 128K over the whole model on 2 H200s, in a call where pair_sum sums hid 29% and
# 41% (benchmarks/tensor_parallel.py). NCCL's own kernels hid 9-15%: they wait for SMs that
# cuBLAS's GEMMs hold.
COPY_ENGINE_HIDDEN = 0.5
# With NCCL (more than 2 ranks): a chunk run in two waves (facli.parallel.waves, the KV cache all
# on the GPUs) hid 38-55% on 4 H200s at 32K and 128K, in one pass or in 16K chunks; an
# all_reduce per tile, where the waves do not apply, 3-14% there and 9-15% on 2 H200s
# (docs/benchmarks.md, "Four GPUs").
NCCL_WAVES_HIDDEN = 0.4
NCCL_TILING_HIDDEN = 0.1
# Per host layer per decode step of CPU attention ("cpu" and "split"), beyond its bytes: the
# host waits for q, the GPU for the CPU's partials, and the queue between them drains. Fitted
# where the bytes are few: a 1K prompt in the 256K plan above decoded at 6.76 ms per step in
# "cpu" mode, 6.15 predicted with 20 us here.
CPU_ATTENTION_SYNC_S = 170e-6
# Per host layer per "split" decode step, beyond the above: the slot's wait, the GPU's partial
# and the merge, which the GPU does between the CPU's part and the next layer. In the same
# plan, split steps took 8.67 / 10.4 / 29.8 ms for 1K / 8K / 32K prompts, 0.4-0.75 ms per host
# layer above the model without it (benchmarks/offloaded_decode.py at 35cc7cf).
SPLIT_LAYER_S = 0.6e-3
# CPU attention over fp8 rows, as a share of the spec's rate (bytes of cache per second): PyTorch
# converts e4m3 to float32 tiles slowly on the CPU. On the 16-core H200 host an fp8 cache was
# read at 1.9-2.1 GB/s against 43-46 GB/s for a bf16 cache through the flash kernel, in one call
# (benchmarks/cpu_attention.py, 31849e2); converting to bf16 tiles for the flash kernel instead
# measured 0.3-0.7 GB/s.
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
        attention = attention * FP8_PREFILL_ATTENTION_FACTOR
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
    sum is capped by the host's memory bandwidth, both scaled by the same factor (measured on a
    16-core H200 host: 52 and 44 GB/s at once, 96 together, against 55 and 50 alone;
    benchmarks/offload.py)."""
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
