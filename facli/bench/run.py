"""A whole `facli bench` run: facli on its tensor-parallel ranks, then the transformers baseline
on the first device of this process, then the derived figures.

    report = run_bench(BenchRequest(depths=(8192, 32768), synthetic="llama-7b"))

facli runs first (through facli.parallel.launch; each rank runs facli.bench.measure.bench_rank),
then, with facli's memory released, the baseline runs. The report is JSON-ready
(facli.bench.report formats it).
"""

import statistics
import time

from facli.bench.baseline import run_baseline
from facli.bench.environment import environment, hbm_gbps
from facli.bench.measure import bench_rank
from facli.bench.report import add_derived
from facli.bench.request import BenchRequest, release_memory, resolve
from facli.models.recipe_loader import load_model_recipe, resolve_model_config
from facli.models.resolve import resolve_device
from facli.parallel.launch import launch
from facli.run.placement import hardware_for, planned_devices as planned_degree

SCHEMA = "facli.bench/1"
ROUND_FIGURES = ("ttft_s", "prefill_tokens_per_s", "decode_tokens_per_s")


def run_bench(request: BenchRequest) -> dict:
    """facli on `devices` ranks, then the baseline here, `request.repeats` times in turn;
    returns the whole JSON-ready report, each speed figure the median of the rounds."""
    device = resolve_device(request.run.device)
    started = time.time()
    first = run_round(request, device)
    rounds = [first] + [run_round(request, device, reference=first[0], baseline_first=index % 2 == 1)
                        for index in range(1, request.repeats)]
    for facli, _ in rounds:
        facli.pop("prompt_ids")
    facli_result = median_of_rounds([facli for facli, _ in rounds])
    baseline = None
    if request.baseline == "transformers":
        baseline = median_of_rounds([baseline for _, baseline in rounds])
    report = {
        "schema": SCHEMA,
        "environment": environment(device, request.run.devices),
        "request": request.as_dict(),
        "facli": facli_result,
        "transformers": baseline,
        "wall_s": time.time() - started,
    }
    return add_derived(report, hbm_gbps(device))


def run_round(request: BenchRequest, device, *, reference: dict | None = None,
              baseline_first: bool = False) -> tuple[dict, dict | None]:
    """One round: facli at every depth and the baseline on the same prompts, each with the
    other's memory released. The baseline takes the prompt ids, dtype and rows of `reference`
    (the first round's facli result), else of this round's; with baseline_first it runs before
    facli, so that over the rounds neither side always runs on a machine the other has warmed."""
    def facli_side() -> dict:
        result = launch(bench_rank, (request,), world_size=request.run.devices,
                        device_type=device.type)
        release_memory(device)
        return result

    def baseline_side(source: dict) -> dict:
        rows = {r["depth"]: r.get("rows") or request.run.batch or 1 for r in source["depths"]}
        result = run_baseline(request, resolve(request), source["prompt_ids"], source["dtype"],
                              device, rows)
        release_memory(device)
        return result

    if request.baseline != "transformers":
        return facli_side(), None
    if baseline_first:
        baseline = baseline_side(reference)
        return facli_side(), baseline
    facli_result = facli_side()
    return facli_result, baseline_side(reference or facli_result)


def median_of_rounds(results: list[dict]) -> dict:
    """The first round's result with each depth's speed figures replaced by their median over
    the rounds where that depth ran; every round's figures stay under `rounds`."""
    combined = dict(results[0], depths=[dict(record) for record in results[0]["depths"]])
    if len(results) == 1:
        return combined
    for index, record in enumerate(combined["depths"]):
        runs = [result["depths"][index] for result in results]
        record["rounds"] = {key: [run.get(key) for run in runs] for key in ROUND_FIGURES}
        for key in ROUND_FIGURES:
            values = [run.get(key) for run in runs if run["status"] == "ok" and run.get(key) is not None]
            if values:
                record[key] = statistics.median(values)
    return combined


def planned_devices(model, synthetic, device, ctx, dtype, kv_dtype, decode_mode, rows) -> int:
    """`--devices auto`: the planner's degree for the model at the largest context measured, on
    this machine (1 on the CPU)."""
    if synthetic is not None:
        name, config = f"synthetic:{synthetic}", load_model_recipe(synthetic).config
    else:
        name, config = resolve_model_config(model)
    hardware = hardware_for(resolve_device(device))
    return planned_degree(config, name, hardware, ctx, dtype=dtype, kv_dtype=kv_dtype,
                          decode_mode=decode_mode, batch=rows or 1)
