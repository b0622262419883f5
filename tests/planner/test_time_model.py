"""The time model's decode of host layers (split shares, CPU attention over fp8 rows) and its
predictions for a prompt shorter than the plan's context."""

from dataclasses import replace

import pytest

from facli.models.recipe_loader import load_model_recipe
from facli.planner.hardware import load_hardware
from facli.planner.search import PlanOptions, plan, predict_prompt
from facli.planner.time_model import (
    CPU_ATTENTION_SYNC_S,
    CPU_FP8_ATTENTION_SHARE,
    SPLIT_LAYER_S,
    Layout,
    decode_breakdown,
    decode_wave_fill,
    prefill_breakdown,
    split_cpu_share,
)


def model(name):
    return load_model_recipe(name).config


def options(**values):
    return PlanOptions(model_name=values.pop("model_name", "m"), **values)


def _layout(hardware, ctx, host_layers, mode):
    return Layout(model("llama-7b"), ctx, 1, 1, 16384, 16384, host_layers, mode, 2, 2)


@pytest.mark.parametrize("host_layers", [3, 4, 8])
def test_split_share_balances_the_cpu_against_pcie(host_layers):
    """Per host layer, the GPU work in between plus the CPU's part (which the GPU waits for)
    lasts as long as the next layer's PCIe part (which streams meanwhile)."""
    hardware = load_hardware("1xH200-141GB")
    layout = _layout(hardware, 256 * 1024, host_layers, "split")
    share = split_cpu_share(hardware, layout)
    times = decode_breakdown(hardware, layout)
    layer = 2 * 256 * 1024 * 32 * 128 * 2
    pcie, cpu = (rate * 1e9 * 96 / (55 + 54) for rate in (55, 54))  # capped by host memory
    device = times["decode_device_s"]  # with (1 - share) of each host layer read from a slot
    by_cpu = share * layer / cpu + CPU_ATTENTION_SYNC_S + SPLIT_LAYER_S
    assert device / host_layers + by_cpu == pytest.approx((1 - share) * layer / pcie, rel=1e-6)
    assert times["decode_step_s"] == pytest.approx(host_layers * (1 - share) * layer / pcie)
    for mode in ("prefetch", "cpu"):
        other = decode_breakdown(hardware, _layout(hardware, 256 * 1024, host_layers, mode))
        assert times["decode_step_s"] < 0.7 * other["decode_step_s"]


def test_split_with_a_slow_cpu_streams_nearly_everything():
    """A CPU at a tenth of PCIe's rate takes a small share, and split then predicts about what
    prefetch does, never less than the PCIe part's time."""
    slow_cpu = replace(load_hardware("1xH200-141GB"), cpu_attention_gbps=5.5)
    for ctx, host_layers in ((256 * 1024, 4), (16 * 1024, 8)):
        split = _layout(slow_cpu, ctx, host_layers, "split")
        prefetch = decode_breakdown(slow_cpu, _layout(slow_cpu, ctx, host_layers, "prefetch"))
        share = split_cpu_share(slow_cpu, split)
        assert 0 < share < 0.1
        times = decode_breakdown(slow_cpu, split)
        assert times["decode_step_s"] == pytest.approx(prefetch["decode_step_s"], rel=0.1)


def test_split_where_pcie_outpaces_the_gpu_leaves_the_cpu_nothing():
    """With a link faster than the GPU's work between host layers, the CPU takes no rows and
    every host row still crosses the link."""
    fast_link = replace(load_hardware("1xH200-141GB"), host_device_gbps=4000.0,
                        cpu_memory_gbps=10000.0)
    split = _layout(fast_link, 256 * 1024, 4, "split")
    assert split_cpu_share(fast_link, split) == 0.0
    times = decode_breakdown(fast_link, split)
    layer = 2 * 256 * 1024 * 32 * 128 * 2
    assert times["decode_host_kv_s"] == pytest.approx(4 * layer / 4000e9)


def test_split_leaves_the_cpu_nothing_where_the_slots_keep_their_layers():
    hardware = load_hardware("1xH200-141GB")
    layout = _layout(hardware, 256 * 1024, 2, "split")
    assert split_cpu_share(hardware, layout) == 0.0
    assert split_cpu_share(hardware, _layout(hardware, 256 * 1024, 4, "prefetch")) == 0.0


def test_fp8_rows_on_the_host_are_not_left_to_the_cpu():
    """PyTorch reads an fp8 cache on the CPU at a few percent of a bf16 cache's rate, so a plan
    that offloads fp8 KV streams nearly all of it over PCIe."""
    h200 = load_hardware("1xH200-141GB")
    fp8 = plan(model("llama-7b"), h200, 640 * 1024, 1, options(kv_dtype="fp8"))
    assert fp8.host.layers and fp8.decode_mode in ("prefetch", "split")
    assert fp8.host_cpu_share < 0.1
    layout = Layout(model("llama-7b"), 640 * 1024, 1, 1, 16384, 16384, 16, "cpu", 2, 1)
    host_kv = 16 * 2 * 640 * 1024 * 32 * (128 + 4)
    cpu = decode_breakdown(h200, layout)["decode_host_kv_s"]
    assert cpu == pytest.approx(host_kv / (54e9 * CPU_FP8_ATTENTION_SHARE) + 16 * CPU_ATTENTION_SYNC_S)


@pytest.mark.parametrize("hardware, ctx", [("1xH200-141GB", 256 * 1024), ("1xH200-141GB", 32 * 1024),
                                           ("8xV100-32GB", 256 * 1024)])
def test_predictions_for_a_shorter_prompt_use_the_plans_placement(hardware, ctx):
    spec, config = load_hardware(hardware), model("llama-7b")
    result = plan(config, spec, ctx, 1, options())
    full = predict_prompt(config, spec, result, ctx)
    assert (full.ttft_s, full.decode_tokens_per_s) == pytest.approx(
        (result.timing.ttft_s, result.timing.decode_tokens_per_s))
    assert (full.decode_mode, full.cpu_share) == (result.decode_mode, result.host_cpu_share)
    short = predict_prompt(config, spec, result, ctx // 8)
    assert short.ttft_s < result.timing.ttft_s / 8
    assert short.decode_tokens_per_s >= result.timing.decode_tokens_per_s


def test_a_shorter_prompt_keeps_every_host_layer_in_the_slots():
    """Llama-7B planned for 256K on one H200 keeps 4 layers' KV on the host. The two staging
    slots hold 128K rows of each at once: a prompt below that decodes about as fast as with
    every layer's KV on the GPU, one above streams and splits again."""
    spec, config = load_hardware("1xH200-141GB"), model("llama-7b")
    result = plan(config, spec, 256 * 1024, 1, options())
    assert len(result.host.layers) == 4 and result.decode_mode == "split"
    assert any("a prompt of up to 128k tokens keeps every host layer's rows there" in line
               for line in result.explanation)
    assert result.host.packed_prompt_tokens == 128 * 1024
    packed = predict_prompt(config, spec, result, 120_000, choose_mode=True)
    assert packed.packed and packed.cpu_share == 0.0
    resident = plan(config, spec, 120_000, 1, options())
    assert not resident.host.layers
    assert packed.decode_tokens_per_s == pytest.approx(resident.timing.decode_tokens_per_s, rel=0.05)
    over = predict_prompt(config, spec, result, 140_000, choose_mode=True)
    assert not over.packed and over.decode_mode == "split"
    assert over.decode_tokens_per_s < packed.decode_tokens_per_s / 3
    # Its first token comes without reloading any host layer's prefix.
    assert packed.ttft_s == pytest.approx(resident.timing.ttft_s, rel=0.02)


@pytest.mark.parametrize("prompt", [140_000, 200_000, 256 * 1024])
def test_each_prompt_gets_its_fastest_host_decode_mode(prompt):
    spec, config = load_hardware("1xH200-141GB"), model("llama-7b")
    result = plan(config, spec, 256 * 1024, 1, options())
    chosen = predict_prompt(config, spec, result, prompt, choose_mode=True)
    pinned = {mode: predict_prompt(config, spec, replace(result, decode_mode=mode), prompt)
              for mode in ("prefetch", "cpu", "split")}
    fastest = max(pinned, key=lambda mode: pinned[mode].decode_tokens_per_s)
    assert (chosen.decode_mode, chosen.decode_tokens_per_s) == (fastest, pinned[fastest].decode_tokens_per_s)
    if prompt == 256 * 1024:
        assert (chosen.decode_mode, chosen.cpu_share) == pytest.approx(
            (result.decode_mode, result.host_cpu_share))
    # Without host layers there is nothing to choose.
    small = plan(config, spec, 32 * 1024, 1, options())
    assert predict_prompt(config, spec, small, 1024, choose_mode=True).decode_mode == "resident"


def test_the_runtime_sets_each_prompts_mode_on_its_kv_store():
    from types import SimpleNamespace

    from facli.run.runtime import Runtime

    spec, config = load_hardware("1xH200-141GB"), model("llama-7b")
    result = plan(config, spec, 256 * 1024, 1, options())

    class Loaded(SimpleNamespace):  # what decode_for_prompt uses of a Runtime
        decode_for_prompt = Runtime.decode_for_prompt
        predict_prompt = Runtime.predict_prompt

    def runtime(decode_mode):
        kv = SimpleNamespace(decode_mode=result.decode_mode, cpu_share=result.host_cpu_share)
        return Loaded(plan=result, config=config, hardware=spec, kv=kv,
                      asked_decode_mode=decode_mode)

    auto = runtime("auto")
    chosen = Runtime.decode_for_prompt(auto, 140_000)
    assert (auto.kv.decode_mode, auto.kv.cpu_share) == (chosen.decode_mode, chosen.cpu_share)
    short = runtime("auto")  # packed: the mode set is for after the slots, at 128K
    assert Runtime.decode_for_prompt(short, 1024).packed
    past = predict_prompt(config, spec, result, 128 * 1024 + 1, choose_mode=True)
    assert (short.kv.decode_mode, short.kv.cpu_share) == (past.decode_mode, past.cpu_share)
    assert short.kv.decode_mode == "split" and short.kv.cpu_share > 0.3
    pinned = runtime("prefetch")  # as asked, whatever would be faster
    pinned.plan = replace(result, decode_mode="prefetch", host_cpu_share=0.0)
    assert Runtime.decode_for_prompt(pinned, 140_000).decode_mode == "prefetch"
    assert pinned.kv.decode_mode == "prefetch"
    resident = runtime("auto")
    resident.plan = plan(config, spec, 32 * 1024, 1, options())
    assert Runtime.decode_for_prompt(resident, 1024) is None


def test_a_batch_prefills_its_sequences_one_after_another():
    hardware = load_hardware("1xH200-141GB")
    one = prefill_breakdown(hardware, Layout(model("llama-7b"), 8192, 1, 1, 4096, 4096, 0, "resident", 2, 2))
    five = prefill_breakdown(hardware, Layout(model("llama-7b"), 8192, 5, 1, 4096, 4096, 0, "resident", 2, 2))
    assert five == pytest.approx({name: 5 * seconds for name, seconds in one.items()})


@pytest.mark.parametrize("rows, kv_dtype_bytes, fill", [
    (1, 2, 1.0),        # one sequence: the split count fills one wave
    (2, 2, 1.0),        # 64 programs on 132 SMs: 2 splits each
    (7, 2, 896 / 924),  # 224 programs: 4 splits fill 7 waves (1 split: 224 of 264)
    (8, 2, 256 / 264),
    (8, 1, 1024 / 1056),  # fp8: two programs per SM, at least 4 splits per row
    (9, 1, 2016 / 2112),  # 288 programs: 7 splits are the fewest that fill 95%
])
def test_rows_beyond_half_a_wave_read_their_cache_at_the_filled_share(rows, kv_dtype_bytes, fill):
    h200 = load_hardware("1xH200-141GB")
    layout = Layout(model("llama-7b"), 32768, rows, 1, 4096, 4096, 0, "resident", 2,
                    kv_dtype_bytes)
    assert decode_wave_fill(h200, layout) == pytest.approx(fill)
    unknown = replace(h200, devices=(replace(h200.devices[0], sms=0),))
    assert decode_wave_fill(unknown, layout) == 1.0
