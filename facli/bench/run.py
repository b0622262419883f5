"""A whole `facli bench` run: facli on its tensor-parallel ranks, then the transformers baseline
on the first device of this process, then the derived figures.

    report = run_bench(BenchRequest(synthetic="llama-7b", depths=(8192, 32768)))

facli runs first (through facli.parallel.launch; each rank runs facli.bench.measure.bench_rank),
then, with facli's memory released, the baseline runs. The report is JSON-ready
(facli.bench.report formats it).
"""

import dataclasses
import time

from facli import options
from facli.bench.baseline import run_baseline
from facli.bench.environment import environment, hbm_gbps
from facli.bench.measure import bench_rank
from facli.bench.report import add_derived
from facli.bench.request import BenchRequest, release_memory, resolve
from facli.parallel.launch import launch
from facli.placement import hardware_for
from facli.recipe_loader import load_model_recipe, resolve_model_config
from facli.resolve import resolve_device

SCHEMA = "facli.bench/1"


def run_bench(request: BenchRequest) -> dict:
    """facli on `devices` ranks, then the baseline here; returns the whole JSON-ready report."""
    device = resolve_device(request.device)
    started = time.time()
    facli_result = launch(bench_rank, (request,), world_size=request.devices, device_type=device.type)
    release_memory(device)
    prompt = facli_result.pop("prompt_ids")
    baseline = None
    if request.baseline == "transformers":
        rows = {r["depth"]: r.get("rows") or request.batch or 1 for r in facli_result["depths"]}
        baseline = run_baseline(request, resolve(request), prompt, facli_result["dtype"], device,
                                rows)
    report = {
        "schema": SCHEMA,
        "environment": environment(device, request.devices),
        "request": {**dataclasses.asdict(request), "depths": list(request.depths)},
        "facli": facli_result,
        "transformers": baseline,
        "wall_s": time.time() - started,
    }
    return add_derived(report, hbm_gbps(device))


def planned_devices(model, synthetic, device, ctx, dtype, kv_dtype, decode_mode, rows) -> int:
    """`--devices auto`: the planner's degree for the model at the largest context measured, on
    this machine (1 on the CPU)."""
    if synthetic is not None:
        name, config = f"synthetic:{synthetic}", load_model_recipe(synthetic).config
    else:
        name, config = resolve_model_config(model)
    hardware = hardware_for(resolve_device(device))
    return options.planned_devices(config, name, hardware, ctx, dtype=dtype, kv_dtype=kv_dtype,
                                   decode_mode=decode_mode, batch=rows or 1)
