"""The Plan's JSON schema: stable keys, plain JSON types, and a lossless round trip."""

import json

import pytest

from facli.models.recipe_loader import load_model_recipe
from facli.planner.hardware import load_hardware
from facli.planner.plan import SCHEMA_VERSION, Plan
from facli.planner.search import PlanOptions, plan

TOP = {"schema_version": int, "model": str, "hardware": str, "ctx": int, "batch": int,
       "weight_dtype": str, "kv_dtype": str, "tp": int, "device_kind": str, "devices": list,
       "gpu_layers": list, "host_layers": list, "host": dict, "prefill_chunk": int,
       "allreduce_tile_tokens": int, "decode_mode": str, "timing": dict, "fits": bool,
       "explanation": list, "host_cpu_share": float, "peak_bytes": int}
DEVICE = {"index": int, "kind": str, "name": str, "capacity_bytes": int, "reserved_bytes": int,
          "margin_bytes": int, "budget_bytes": int, "weights_bytes": int, "kv_bytes": int,
          "kv_staging_bytes": int, "activation_bytes": int, "comm_bytes": int,
          "workspace_bytes": int, "peak_bytes": int, "free_bytes": int}
HOST = {"ram_bytes": int, "budget_bytes": int, "kv_bytes": int, "layers": list,
        "packed_prompt_tokens": int}
TIMING = {"prefill_s": float, "ttft_s": float, "decode_step_s": float,
          "decode_tokens_per_s": float, "new_tokens": int, "total_s": float, "terms": dict,
          "unknown": str}
TERMS = {"prefill_matmul_s", "prefill_attention_s", "prefill_elementwise_and_overhead_s",
         "prefill_comm_exposed_s", "prefill_host_transfer_exposed_s", "decode_device_s",
         "decode_host_kv_s", "decode_comm_s"}

CASES = [("llama-7b", "1xH200-141GB", 256 * 1024), ("llama-7b", "8xV100-32GB", 256 * 1024),
         ("qwen2-7b", "1xRTX4090-24GB", 16 * 1024)]


def _plan(name, hardware, ctx):
    return plan(load_model_recipe(name).config, load_hardware(hardware), ctx, 1,
                PlanOptions(model_name=name))


def _check(raw: dict, schema: dict):
    assert set(raw) == set(schema)
    for key, kind in schema.items():
        assert isinstance(raw[key], kind), (key, raw[key])


@pytest.mark.parametrize(("name", "hardware", "ctx"), CASES, ids=[f"{m}-{h}" for m, h, _ in CASES])
def test_schema(name, hardware, ctx):
    result = _plan(name, hardware, ctx)
    raw = json.loads(result.to_json())
    _check(raw, TOP)
    assert raw["schema_version"] == SCHEMA_VERSION == 1
    assert len(raw["devices"]) == raw["tp"]
    for device in raw["devices"]:
        _check(device, DEVICE)
    _check(raw["host"], HOST)
    _check(raw["timing"], TIMING)
    assert set(raw["timing"]["terms"]) == TERMS
    assert raw["decode_mode"] in ("resident", "prefetch", "cpu", "split")
    assert 0.0 <= raw["host_cpu_share"] <= 1.0
    assert (raw["host_cpu_share"] > 0) == (raw["decode_mode"] == "split")
    assert raw["host_layers"] == raw["host"]["layers"]
    assert (raw["host"]["packed_prompt_tokens"] > 0) == bool(raw["host_layers"])
    assert all(isinstance(line, str) for line in raw["explanation"])


@pytest.mark.parametrize(("name", "hardware", "ctx"), CASES, ids=[f"{m}-{h}" for m, h, _ in CASES])
def test_round_trip(name, hardware, ctx):
    result = _plan(name, hardware, ctx)
    again = Plan.from_dict(json.loads(result.to_json()))
    assert again == result and again.to_json() == result.to_json()


def test_plan_is_frozen_and_summarized():
    result = _plan(*CASES[0])
    with pytest.raises(AttributeError):
        result.tp = 2
    line = result.summary_line()
    assert "\n" not in line and "llama-7b" in line and "256k" in line and "fits" in line


def test_other_schema_versions_are_refused():
    raw = json.loads(_plan(*CASES[2]).to_json())
    raw["schema_version"] = 99
    with pytest.raises(ValueError, match="schema"):
        Plan.from_dict(raw)
