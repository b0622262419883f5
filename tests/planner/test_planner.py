"""Planner invariants: never over budget, monotone in ctx, refuses when it should, fastest first."""

import subprocess
import sys
import time

import pytest

from facli.errors import FacliError, OutOfMemoryPlanError
from facli.offload.device_cache import DeviceKVCache
from facli.planner import policy
from facli.planner.hardware import GpuSpec, HardwareSpec, load_hardware
from facli.planner.memory import workspace_bytes
from facli.planner.search import (
    candidates,
    largest_fitting_ctx,
    plan,
)
from facli.planner.time_model import (
    DECODE_LAYER_OVERHEAD_S,
    EAGER_STORE_LAYER_HOST_S,
    FP8_KERNEL_PREFILL_ATTENTION_FACTOR,
    FP8_PREFILL_ATTENTION_FACTOR,
)
from facli.units import GIB, parse_ctx
from planner_cases import model, options


def test_fastattention_setup_fits_llama_7b_at_256k_on_8_v100():
    result = plan(model("llama-7b"), load_hardware("8xV100-32GB"), 256 * 1024, 1, options())
    assert result.fits and result.tp in (1, 2, 4, 8)
    assert result.weight_dtype == "fp16"  # Volta: no bf16
    assert all(d.peak_bytes <= d.budget_bytes for d in result.devices)
    assert len(result.gpu_layers) + len(result.host_layers) == 32


GRID = [
    ("llama-7b", "8xV100-32GB"), ("llama-7b", "1xH200-141GB"), ("llama-7b", "1xRTX4090-24GB"),
    ("llama-3-8b", "1xA100-80GB"), ("llama-2-13b", "2xH200-141GB"), ("qwen2-7b", "8xH200-141GB"),
    ("mistral-7b", "1xH100-80GB"),
]
CTXS = ["4k", "32k", "100k", "128k", "256k", "1m"]


def _plan_or_none(name, hardware, ctx, batch=1, **values):
    try:
        return plan(model(name), load_hardware(hardware), parse_ctx(ctx), batch, options(**values))
    except OutOfMemoryPlanError:
        return None


@pytest.mark.parametrize(("name", "hardware"), GRID, ids=[f"{m}-{h}" for m, h in GRID])
@pytest.mark.parametrize("batch", [1, 3])
def test_never_over_budget(name, hardware, batch):
    for ctx in CTXS:
        result = _plan_or_none(name, hardware, ctx, batch)
        if result is None:
            continue
        for device in result.devices:
            assert device.peak_bytes <= device.budget_bytes, (ctx, device)
            assert device.peak_bytes == (device.weights_bytes + device.kv_bytes
                                         + device.kv_staging_bytes + device.activation_bytes
                                         + device.comm_bytes + device.workspace_bytes)
        assert result.host.kv_bytes <= result.host.budget_bytes
        assert bool(result.host.layers) == (result.decode_mode != "resident")
        assert sorted(result.gpu_layers + result.host.layers) == list(range(len(
            result.gpu_layers) + len(result.host.layers)))


@pytest.mark.parametrize(("name", "hardware"), GRID, ids=[f"{m}-{h}" for m, h in GRID])
def test_monotone_in_ctx(name, hardware):
    ladder = [parse_ctx(c) for c in ("2k", "8k", "32k", "64k", "128k", "192k", "256k", "512k",
                                     "1m", "2m")]
    results = [_plan_or_none(name, hardware, ctx) for ctx in ladder]
    fitted = [r is not None for r in results]
    assert fitted == sorted(fitted, reverse=True), "once it refuses, longer contexts refuse too"
    plans = [r for r in results if r is not None]
    for shorter, longer in zip(plans, plans[1:]):
        assert longer.timing.ttft_s >= shorter.timing.ttft_s
        assert longer.timing.decode_step_s >= shorter.timing.decode_step_s * 0.999
        assert longer.timing.total_s >= shorter.timing.total_s
        assert len(longer.host.layers) >= len(shorter.host.layers) or longer.tp > shorter.tp


def test_refuses_with_needs_has_short_by_and_largest_ctx():
    hw, config = load_hardware("1xRTX4090-24GB"), model("llama-7b")
    with pytest.raises(OutOfMemoryPlanError) as error:
        plan(config, hw, 256 * 1024, 1, options(model_name="llama-7b"))
    message = str(error.value)
    assert "\n" not in message
    for words in ("need of", "available", "short by", "largest context that fits here"):
        assert words in message
    largest = largest_fitting_ctx(config, hw, 1, options())
    assert str(largest) in message
    assert plan(config, hw, largest, 1, options()).fits
    with pytest.raises(OutOfMemoryPlanError):
        plan(config, hw, largest + 1, 1, options())


def test_a_refusal_names_fp8_only_where_it_makes_the_context_fit():
    h200, config = load_hardware("1xH200-141GB"), model("llama-7b")
    with pytest.raises(OutOfMemoryPlanError, match=r"use --kv-dtype fp8 \(it fits"):
        plan(config, h200, 512 * 1024, 1, options())
    assert plan(config, h200, 512 * 1024, 1, options(kv_dtype="fp8")).fits
    with pytest.raises(OutOfMemoryPlanError) as error:
        plan(config, h200, 1 << 20, 1, options())
    largest = largest_fitting_ctx(config, h200, 1, options(kv_dtype="fp8"))
    assert f"with --kv-dtype fp8, up to {largest} tokens" in str(error.value)
    assert not plan(config, h200, largest + 1, 1, options(kv_dtype="fp8", force=True)).fits
    with pytest.raises(OutOfMemoryPlanError) as error:
        plan(config, h200, 1 << 20, 1, options(kv_dtype="fp16"))
    assert "fp8" not in str(error.value)


def test_weights_that_do_not_fit_anywhere():
    with pytest.raises(OutOfMemoryPlanError, match="nothing fits here even at 1 token"):
        plan(model("llama-2-13b"), load_hardware("1xRTX4090-24GB"), 4096, 1, options())
    assert largest_fitting_ctx(model("llama-2-13b"), load_hardware("1xRTX4090-24GB")) == 0


def test_force_returns_the_least_short_plan():
    result = plan(model("llama-7b"), load_hardware("1xRTX4090-24GB"), 1 << 20, 1,
                  options(force=True))
    assert not result.fits and "DOES NOT FIT" in result.explanation[-1]


def test_offloads_layers_when_kv_outgrows_the_gpu():
    result = plan(model("llama-7b"), load_hardware("1xH200-141GB"), 256 * 1024, 1, options())
    assert result.fits and 0 < len(result.host.layers) < 32
    device = result.devices[0]
    layer = 2 * 256 * 1024 * 32 * 128 * 2  # K and V of one layer, bf16
    assert device.kv_bytes == len(result.gpu_layers) * layer
    assert device.kv_staging_bytes == 2 * layer
    assert result.host.kv_bytes == len(result.host.layers) * layer
    # Four host layers, more than the two staging slots: each decode step reads all of them.
    # Split decode streams part of each over PCIe while the CPU attends the rest.
    assert result.decode_mode == "split" and 0.3 < result.host_cpu_share < 0.6
    assert any("decode mode split" in line and "prefetch would take" in line
               for line in result.explanation)
    for mode in ("prefetch", "cpu"):
        fixed = plan(model("llama-7b"), load_hardware("1xH200-141GB"), 256 * 1024, 1,
                     options(decode_mode=mode))
        assert fixed.decode_mode == mode and fixed.host_cpu_share == 0.0
        assert fixed.timing.decode_step_s > 1.4 * result.timing.decode_step_s


def test_a_plan_that_offloads_names_fp8_when_it_would_be_faster():
    h200 = load_hardware("1xH200-141GB")
    offloading = plan(model("llama-7b"), h200, 256 * 1024, 1, options())
    hints = offloading.hints
    assert len(hints) == 1 and "--kv-dtype fp8" in hints[0] and hints[0] in offloading.explanation
    assert "all 32 layers' KV on the GPU: decode 32.0 tokens/s against 5.1" in hints[0]
    # Never when the user chose the KV dtype, or when nothing goes to host memory.
    for chosen in (options(kv_dtype="fp16"), options(kv_dtype="fp8")):
        result = plan(model("llama-7b"), h200, 256 * 1024, 1, chosen)
        assert not result.hints
    resident = plan(model("llama-7b"), h200, 32 * 1024, 1, options())
    assert not resident.hints


@pytest.mark.parametrize("kernel_reads_fp8", [False, True])
def test_fp8_kv_keeps_everything_on_one_h200(monkeypatch, kernel_reads_fp8):
    monkeypatch.setattr(policy, "HOPPER_PREFILL_READS_FP8", kernel_reads_fp8)
    result = plan(model("llama-7b"), load_hardware("1xH200-141GB"), 256 * 1024, 1,
                  options(kv_dtype="fp8"))
    assert result.kv_dtype == "fp8" and not result.host.layers
    assert result.devices[0].kv_bytes == 32 * 2 * 256 * 1024 * 32 * (128 + 4)
    assert result.devices[0].kv_staging_bytes == 0
    # Where Hopper's prefill kernel reads the fp8 prefix as stored, no dequantized 64K-row tile
    tile = 0 if kernel_reads_fp8 else 2 * 65536 * 32 * 128 * 2
    assert result.devices[0].workspace_bytes == workspace_bytes(model("llama-7b"), 256 * 1024, 1) + tile


def test_fp8_prefill_elsewhere_reads_a_dequantized_tile():
    """Other GPUs read the fp8 prefix through a dequantized K and V tile of 64K rows (bf16): a
    transient buffer, so workspace rather than staging."""
    a100 = load_hardware("1xA100-80GB")
    result = plan(model("llama-7b"), a100, 128 * 1024, 1, options(kv_dtype="fp8"))
    tile = 2 * 65536 * 32 * 128 * 2
    assert result.devices[0].workspace_bytes == workspace_bytes(model("llama-7b"), 128 * 1024, 1) + tile
    # Rows prefill one at a time: one row's tile, however many rows.
    rows = plan(model("llama-7b"), a100, 32 * 1024, 4, options(kv_dtype="fp8"))
    row_tile = 2 * 32768 * 32 * 128 * 2
    assert rows.devices[0].workspace_bytes == workspace_bytes(model("llama-7b"), 32 * 1024, 4) + row_tile


@pytest.mark.parametrize("ctx, measured_tokens_per_s", [(32768, 129.1), (131072, 54.8),
                                                      (262144, 31.6)])
def test_fp8_decode_replays_graphs_where_the_kernel_reads_e4m3(ctx, measured_tokens_per_s):
    """On Hopper the decode kernel reads the fp8 cache directly and the steps replay a CUDA
    graph: no eager floor, and the step's reads follow the measured runs
    (docs/results/e2e-fp8-1xH200-9a496df.json). Those ran with more small kernels per layer
    than decode has now, so the comparison is of the step less its per-layer overhead, each
    with the overhead of its own code (43 us per layer then)."""
    fp8 = plan(model("llama-7b"), load_hardware("1xH200-141GB"), ctx, 1, options(kv_dtype="fp8"))
    assert fp8.timing.decode_step_s < 32 * EAGER_STORE_LAYER_HOST_S
    measured_reads_s = 1 / measured_tokens_per_s - 32 * 43e-6
    predicted_reads_s = fp8.timing.decode_step_s - 32 * DECODE_LAYER_OVERHEAD_S
    assert predicted_reads_s == pytest.approx(measured_reads_s, rel=0.03)


def test_eager_fp8_decode_sets_a_floor_under_the_step_before_sm89():
    """An A100 attends over dequantized fp8 tiles, eagerly: at 32K the step is the host's
    per-layer cost, not the (shorter) GPU work."""
    hardware = load_hardware("1xA100-80GB")
    fp8 = plan(model("llama-7b"), hardware, 32 * 1024, 1, options(kv_dtype="fp8"))
    assert fp8.timing.decode_step_s == pytest.approx(32 * EAGER_STORE_LAYER_HOST_S)


@pytest.mark.parametrize("hardware_name, factor", [
    ("1xA100-80GB", FP8_PREFILL_ATTENTION_FACTOR),  # dequantized tiles
    ("1xH200-141GB", FP8_KERNEL_PREFILL_ATTENTION_FACTOR),  # the kernel reads e4m3
])
def test_fp8_prefill_attention_costs_its_measured_factor(monkeypatch, hardware_name, factor):
    monkeypatch.setattr(policy, "HOPPER_PREFILL_READS_FP8", True)
    hardware = load_hardware(hardware_name)
    bf16 = plan(model("llama-7b"), hardware, 128 * 1024, 1, options(kv_dtype="auto"))
    fp8 = plan(model("llama-7b"), hardware, 128 * 1024, 1, options(kv_dtype="fp8"))
    terms = [dict(p.timing.terms)["prefill_attention_s"] for p in (bf16, fp8)]
    assert terms[1] == pytest.approx(terms[0] * factor)


def test_resident_kv_is_what_the_runtime_allocates():
    config = model("llama-3-8b")
    result = plan(config, load_hardware("1xA100-80GB"), 32 * 1024, 2, options())
    assert result.decode_mode == "resident"
    assert result.devices[0].kv_bytes == DeviceKVCache.bytes_needed(
        config.num_hidden_layers, 2, 32 * 1024, config.num_key_value_heads, config.head_dim, 2)
    assert result.devices[0].weights_bytes == config.num_parameters() * 2


def test_tensor_parallel_splits_kv_and_weights():
    config = model("llama-7b")
    one = plan(config, load_hardware("8xH200-141GB"), 32 * 1024, 1, options(devices=1))
    four = plan(config, load_hardware("8xH200-141GB"), 32 * 1024, 1, options(devices=4))
    assert four.tp == 4 and len(four.devices) == 4
    assert four.devices[0].kv_bytes * 4 == one.devices[0].kv_bytes
    assert four.devices[0].weights_bytes * 4 == pytest.approx(one.devices[0].weights_bytes, rel=0.01)
    assert four.devices[0].reserved_bytes > one.devices[0].reserved_bytes  # NCCL buffers


def test_fixed_choices_are_respected():
    hw = load_hardware("1xH200-141GB")
    result = plan(model("llama-7b"), hw, 256 * 1024, 1,
                  options(prefill_chunk=2048, decode_mode="cpu"))
    assert result.prefill_chunk == 2048 and result.decode_mode == "cpu"
    tiled = plan(model("llama-7b"), load_hardware("8xH200-141GB"), 64 * 1024, 1,
                 options(devices=8, allreduce_tile_tokens=2048))
    assert tiled.tp == 8 and tiled.allreduce_tile_tokens == 2048


@pytest.mark.parametrize(("devices", "match"), [(3, "dividing"), (16, "at most")])
def test_invalid_tp_degree_is_a_user_error(devices, match):
    with pytest.raises(FacliError, match=match):
        plan(model("llama-7b"), load_hardware("8xH200-141GB"), 4096, 1, options(devices=devices))


def test_tp_degrees_searched_divide_the_heads():
    found = candidates(model("qwen2-7b"), load_hardware("8xH200-141GB"), 8192, 1, options())
    assert {c.tp for c in found} == {1, 2, 4}  # 28 query heads, 4 KV heads


def test_picks_the_fastest_fitting_candidate():
    config, hw = model("llama-7b"), load_hardware("8xV100-32GB")
    found = candidates(config, hw, 128 * 1024, 1, options())
    result = plan(config, hw, 128 * 1024, 1, options())
    assert result.timing.total_s == pytest.approx(min(c.total_s for c in found if c.fits))
    assert any(line.startswith("rejected TP") for line in result.explanation)


def test_cpu_only_hardware_gives_a_cpu_plan():
    hw = HardwareSpec("cpu", (), 64 * GIB, 10.0, 50.0, 15.0, 1.0, 0.0, 0.0, GIB)
    result = plan(model("llama-7b"), hw, 4096, 1, options())
    assert result.device_kind == "cpu" and result.decode_mode == "resident"
    assert result.weight_dtype == "fp32"  # the runtime computes in float32 on CPUs
    assert result.devices[0].peak_bytes <= result.devices[0].budget_bytes


def test_explicit_bf16_on_volta_is_refused():
    with pytest.raises(FacliError, match="no bf16"):
        plan(model("llama-7b"), load_hardware("8xV100-32GB"), 4096, 1, options(weight_dtype="bf16"))


def test_prediction_is_in_the_measured_range_on_h200():
    # transformers with cuDNN attention prefills Llama-7B at 32K in about 1.4 s on one H200;
    # the plan's prediction must land within a factor of about two of that.
    result = plan(model("llama-7b"), load_hardware("1xH200-141GB"), 32 * 1024, 1, options())
    assert 0.7 < result.timing.ttft_s < 3.0
    assert 50 < result.timing.decode_tokens_per_s < 300


@pytest.mark.parametrize("hardware, ctx, measured_tokens_per_s", [
    ("1xH100-80GB", 8192, 154.0), ("1xH100-80GB", 32768, 94.9), ("1xH200-141GB", 131072, 52.2)])
def test_decode_prediction_matches_a_measured_run(hardware, ctx, measured_tokens_per_s):
    # `facli bench --synthetic llama-7b`: on one H100 docs/results/e2e-1xH100-af9d3ea.json (8K,
    # 32K), on one H200 docs/results/e2e-bf16-128k-1xH200-21d80c6.json (128K, where a step's
    # small kernels weigh 3%).
    result = plan(model("llama-7b"), load_hardware(hardware), ctx, 1, options())
    assert result.timing.decode_tokens_per_s == pytest.approx(measured_tokens_per_s, rel=0.03)


def test_sliding_window_is_noted():
    result = plan(model("mistral-7b"), load_hardware("1xH100-80GB"), 32 * 1024, 1, options())
    assert any("sliding_window" in line for line in result.explanation)


def test_a_plan_is_quick():
    start = time.perf_counter()
    plan(model("llama-7b"), load_hardware("8xV100-32GB"), 1 << 20, 1, options(force=True))
    assert time.perf_counter() - start < 1.0


def test_odd_heads_and_a_single_layer():
    gpu = GpuSpec("tiny", 4 * GIB, 0, 10.0, 100.0, (8, 0))
    hw = HardwareSpec("tiny", (gpu,) * 3, 8 * GIB, 10.0, 20.0, 5.0, 0.5, 50.0, 10.0, 0)
    from facli.models.config import ModelConfig

    config = ModelConfig.from_dict({
        "model_type": "llama", "vocab_size": 1001, "hidden_size": 192, "intermediate_size": 517,
        "num_hidden_layers": 1, "num_attention_heads": 3, "num_key_value_heads": 3})
    result = plan(config, hw, 63, 1, options())
    assert result.prefill_chunk == 63 and result.tp == 1  # vocab 1001 does not split in 3
    with pytest.raises(FacliError, match="vocab_size 1001"):
        plan(config, hw, 63, 1, options(devices=3))


def test_gpu_ranks_tile_prefill_for_the_copy_engines_and_budget_their_inboxes():
    import inspect

    from facli.parallel import copy_engine
    from facli.run.placement import tensor_parallel_settings
    from facli.planner.policy import COPY_ENGINE_INBOXES, COPY_ENGINE_TILE_TOKENS

    assert inspect.signature(copy_engine.exchange_for).parameters["inboxes"].default == COPY_ENGINE_INBOXES
    config = model("llama-7b")
    two = load_hardware("2xH200-141GB")
    tiled = plan(config, two, 32768, 1, options(devices=2, prefill_chunk=32768))
    untiled = plan(config, two, 32768, 1, options(devices=2, prefill_chunk=32768,
                                                  allreduce_tile_tokens=32768))
    assert tiled.allreduce_tile_tokens == COPY_ENGINE_TILE_TOKENS
    inboxes = COPY_ENGINE_INBOXES * 32768 * config.hidden_size * 2
    assert tiled.devices[0].comm_bytes - untiled.devices[0].comm_bytes == inboxes
    assert tiled.timing.prefill_s < untiled.timing.prefill_s
    settings = tensor_parallel_settings(tiled)
    assert (settings.tile_tokens, settings.reduce_engine) == (COPY_ENGINE_TILE_TOKENS, "copy")
    assert tensor_parallel_settings(untiled).tile_tokens is None
    # A chunk shorter than two tiles, or CPU ranks: one all_reduce per projection, no inboxes.
    short = plan(config, two, 32768, 1, options(devices=2, prefill_chunk=4096))
    assert short.allreduce_tile_tokens == 4096 and tensor_parallel_settings(short).tile_tokens is None
    # A tile of the user's that the chunk holds fewer than two of: no tiles, so no inboxes.
    one_tile = plan(config, two, 32768, 1, options(devices=2, prefill_chunk=32768,
                                                   allreduce_tile_tokens=20000))
    assert tensor_parallel_settings(one_tile).tile_tokens is None
    assert one_tile.devices[0].comm_bytes == untiled.devices[0].comm_bytes


def test_more_than_two_gpu_ranks_prefill_in_two_waves_where_the_cache_is_on_the_gpus():
    from facli.planner.policy import WAVES_TILE_TOKENS
    from facli.run.placement import tensor_parallel_settings

    config, eight = model("llama-7b"), load_hardware("8xH200-141GB")
    waves = plan(config, eight, 32768, 1, options(devices=4, prefill_chunk=32768))
    assert waves.tp == 4 and waves.allreduce_tile_tokens == WAVES_TILE_TOKENS
    settings = tensor_parallel_settings(waves)
    assert settings.waves and settings.reduce_engine == "nccl" and settings.tile_tokens == WAVES_TILE_TOKENS
    assert any("two waves" in line for line in waves.explanation)
    whole = plan(config, eight, 32768, 1, options(devices=4, prefill_chunk=32768, allreduce_tile_tokens=32768))
    assert waves.timing.prefill_s < whole.timing.prefill_s
    assert not tensor_parallel_settings(whole).waves
    # A chunk shorter than two tiles keeps one all_reduce per projection.
    short = plan(config, eight, 32768, 1, options(devices=4, prefill_chunk=8192))
    assert short.allreduce_tile_tokens == 8192 and tensor_parallel_settings(short).tile_tokens is None


def test_nccl_tiles_budget_no_copy_engine_inboxes():
    config, eight = model("llama-7b"), load_hardware("8xH200-141GB")
    tiled = plan(config, eight, 32768, 1, options(devices=4, prefill_chunk=32768, allreduce_tile_tokens=4096))
    untiled = plan(config, eight, 32768, 1, options(devices=4, prefill_chunk=32768, allreduce_tile_tokens=32768))
    assert tiled.allreduce_tile_tokens == 4096
    assert tiled.devices[0].comm_bytes == untiled.devices[0].comm_bytes


def test_prefill_attention_time_follows_the_kernel_of_the_architecture():
    """Hopper runs the Gluon prefill kernel, faster per matmul FLOP than the portable one."""
    from facli.planner.time_model import (ATTENTION_EFFICIENCY, HOPPER_ATTENTION_EFFICIENCY, Layout,
                                          prefill_breakdown)

    layout = Layout(model("llama-7b"), 32 * 1024, 1, 1, 8192, 8192, 0, "resident", 2, 2)
    seconds = {}
    for capability in ((9, 0), (8, 0)):
        gpu = GpuSpec("same rates", 80 * GIB, 0, 700.0, 3000.0, capability)
        hw = HardwareSpec("one", (gpu,), 256 * GIB, 25.0, 100.0, 20.0, 1.0, 0.0, 0.0, GIB)
        seconds[capability] = prefill_breakdown(hw, layout)["prefill_attention_s"]
    assert seconds[(8, 0)] / seconds[(9, 0)] == pytest.approx(HOPPER_ATTENTION_EFFICIENCY / ATTENTION_EFFICIENCY)


def test_plan_memory_hardware_and_policy_import_without_torch():
    """The Plan type, the byte model, the CPU time model, the hardware specs and the run rules
    load without torch (detection imports it when called); the GPU time model reaches torch
    through facli.kernels, whose decode configs it reads."""
    code = ("import sys\n"
            "import facli.planner, facli.planner.cpu_time, facli.planner.hardware\n"
            "import facli.planner.memory, facli.planner.plan, facli.planner.policy\n"
            "print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
