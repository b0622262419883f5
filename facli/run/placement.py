"""Executing a Plan: hardware for this run, the plan itself (and the degree of --devices auto),
and the run settings it implies (weight dtype, tensor-parallel prefill sums). The KV store it
describes: facli.offload.build."""

import dataclasses

import torch

from facli.models.config import ModelConfig
from facli.models.resolve import DTYPES
from facli.parallel.context import TensorParallelSettings
from facli.planner.hardware import HardwareSpec, hardware_from_option
from facli.planner.plan import Plan
from facli.planner.policy import (
    prefills_in_waves,
    splits_into_tiles,
    sums_with_copy_engines,
    uses_offloaded_store,
)
from facli.planner.search import PlanOptions, plan
from facli.run_options import RunOptions


def hardware_for(device: torch.device, hardware: str | None = None, margin=None) -> HardwareSpec:
    """The spec to plan on: detected (or named), without GPUs when the run is on the CPU."""
    spec = hardware_from_option(hardware, margin, gpus=device.type != "cpu")
    if device.type == "cpu" and spec.devices:
        spec = dataclasses.replace(spec, devices=())
    return spec


def plan_run(config: ModelConfig, name: str, hardware: HardwareSpec, options: RunOptions, *,
             ctx: int, world_size: int | None, batch: int = 1) -> Plan:
    """The plan for `batch` sequences of `ctx` tokens on `world_size` ranks (None: the planner's
    degree) with the run's choices; raises when nothing fits. The one planning call of a run:
    the commands plan with it before loading, and the runtime when it is reshaped."""
    return plan(config, hardware, ctx, batch, plan_options(name, options, world_size))


def planned_devices(config, name: str, hardware, ctx: int, *, dtype: str = "auto",
                    kv_dtype: str = "auto", decode_mode: str = "auto", batch: int = 1) -> int:
    """`--devices auto` for a run: the tensor-parallel degree the planner ranks fastest for
    `batch` sequences of `ctx` tokens on `hardware` (1 without GPUs). A plan that does not fit
    still names a degree; the run's own planning then says what is short."""
    options = PlanOptions(weight_dtype=dtype, kv_dtype=kv_dtype, decode_mode=decode_mode,
                          model_name=name, force=True)
    return plan(config, hardware, ctx, batch, options).tp


def plan_options(name: str, options: RunOptions, world_size: int | None) -> PlanOptions:
    """The planner's options for a run on `world_size` ranks with these choices."""
    return PlanOptions(kv_dtype=options.kv_dtype, weight_dtype=options.dtype, devices=world_size,
                       prefill_chunk=options.prefill_chunk, decode_mode=options.decode_mode,
                       force=options.force, allreduce_tile_tokens=options.allreduce_tile_tokens,
                       model_name=name)


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

