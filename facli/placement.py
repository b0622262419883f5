"""Executing a Plan: hardware for this run, the plan itself, and the KV store it describes."""

import dataclasses

import torch

from facli.config import ModelConfig
from facli.errors import FacliError
from facli.kv_cache import DeviceKVCache
from facli.parallel.context import TensorParallelSettings
from facli.planner.hardware import HardwareSpec, hardware_from_option
from facli.planner.plan import Plan
from facli.planner.policy import (
    READS_FP8_FROM,
    holds_rows,
    prefills_in_waves,
    splits_into_tiles,
    sums_with_copy_engines,
    uses_offloaded_store,
)
from facli.planner.search import PlanOptions, plan
from facli.resolve import DTYPES


def hardware_for(device: torch.device, hardware: str | None = None, margin=None) -> HardwareSpec:
    """The spec to plan on: detected (or named), without GPUs when the run is on the CPU."""
    spec = hardware_from_option(hardware, margin)
    if device.type == "cpu" and spec.devices:
        spec = dataclasses.replace(spec, devices=())
    return spec


def plan_run(config: ModelConfig, name: str, hardware: HardwareSpec, *, ctx: int, world_size: int,
             dtype: str, kv_dtype: str, prefill_chunk: int | None, decode_mode: str,
             force: bool, allreduce_tile_tokens: int | None = None, batch: int = 1) -> Plan:
    """The plan for `batch` sequences of `ctx` tokens on `world_size` ranks (raises when nothing
    fits)."""
    options = run_options(name, world_size=world_size, dtype=dtype, kv_dtype=kv_dtype,
                          prefill_chunk=prefill_chunk, decode_mode=decode_mode, force=force,
                          allreduce_tile_tokens=allreduce_tile_tokens)
    return plan(config, hardware, ctx, batch, options)


def run_options(name: str, *, world_size: int, dtype: str, kv_dtype: str,
                prefill_chunk: int | None, decode_mode: str, force: bool,
                allreduce_tile_tokens: int | None = None) -> PlanOptions:
    """The planner's options for a run on `world_size` ranks with these choices."""
    return PlanOptions(kv_dtype=kv_dtype, weight_dtype=dtype, devices=world_size,
                       prefill_chunk=prefill_chunk, decode_mode=decode_mode, force=force,
                       allreduce_tile_tokens=allreduce_tile_tokens, model_name=name)


def weight_dtype(run_plan: Plan) -> torch.dtype:
    return DTYPES[run_plan.weight_dtype]


def tensor_parallel_settings(run_plan: Plan) -> TensorParallelSettings:
    """Where a prefill chunk holds two tiles or more, its sums overlap compute: between two GPUs
    each tile's, relayed by the copy engines (facli.parallel.copy_engine); with more GPU ranks
    each half's, the chunk running in two waves (facli.parallel.waves) where the KV cache is all
    on the GPUs, else an all_reduce per tile."""
    tile = run_plan.allreduce_tile_tokens
    if not splits_into_tiles(run_plan.prefill_chunk, tile):
        return TensorParallelSettings()
    on_gpu = run_plan.device_kind == "cuda"
    if sums_with_copy_engines(run_plan.tp, on_gpu=on_gpu):
        return TensorParallelSettings(tile_tokens=tile, reduce_engine="copy")
    offloaded = uses_offloaded_store(run_plan.decode_mode, run_plan.kv_dtype == "fp8")
    return TensorParallelSettings(tile_tokens=tile, waves=prefills_in_waves(run_plan.tp, on_gpu, offloaded))


def build_kv_store(run_plan: Plan, config: ModelConfig, world_size: int, device: torch.device):
    """All-GPU cache when every layer is resident, else the offloaded store the plan describes."""
    dtype = weight_dtype(run_plan)
    if run_plan.kv_dtype not in (run_plan.weight_dtype, "fp8"):
        raise FacliError(
            f"expected --kv-dtype equal to the weight dtype ({run_plan.weight_dtype}) or fp8, "
            f"got {run_plan.kv_dtype}"
        )
    shape = (config.num_hidden_layers, run_plan.batch, run_plan.ctx,
             config.num_key_value_heads // world_size, config.head_dim)
    fp8 = run_plan.kv_dtype == "fp8"
    if not uses_offloaded_store(run_plan.decode_mode, fp8):
        return DeviceKVCache(*shape, dtype, device)
    reads_fp8 = device.type != "cuda" or torch.cuda.get_device_capability(device) >= READS_FP8_FROM
    if run_plan.batch > 1 and not holds_rows(run_plan.decode_mode, fp8, reads_fp8):
        where = ("on a GPU whose decode kernel reads fp8 (compute capability 8.9 or later)"
                 if run_plan.decode_mode == "resident" else "on the GPUs")
        raise FacliError(
            f"expected the KV cache of batch {run_plan.batch} at ctx {run_plan.ctx} to stay wholly "
            f"{where} (decoding rows together needs that), got a plan with decode mode "
            f"{run_plan.decode_mode} and KV dtype {run_plan.kv_dtype}; lower --batch or --ctx"
        )
    from facli.offload.kv_store import OffloadedKVStore

    mode = run_plan.decode_mode if run_plan.decode_mode != "resident" else "prefetch"
    return OffloadedKVStore(*shape, dtype, device, host_layers=frozenset(run_plan.host.layers),
                            decode_mode=mode, kv_dtype="fp8" if run_plan.kv_dtype == "fp8" else None,
                            cpu_share=run_plan.host_cpu_share)
