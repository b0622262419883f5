"""facli's side of `facli bench`, on each tensor-parallel rank: load once, then at every depth
re-plan, warm up and time one generate (with rows: every row decoded together), next to the
plan's predictions. Out of memory and plans that do not fit become a status, not an error.
"""

import dataclasses

import psutil
import torch

from facli.bench.request import (
    DOES_NOT_FIT,
    GREEDY,
    OUT_OF_MEMORY,
    WARM_UP_NEW_TOKENS,
    BenchRequest,
    progress,
    prompt_ids,
    prompt_length,
    release_memory,
    resolve,
)
from facli.errors import FacliError, OutOfMemoryPlanError
from facli.models.resolve import check_context, resolve_device
from facli.parallel.comm import all_reduce_sum, broadcast_tokens
from facli.parallel.context import ParallelContext
from facli.run.batching import RowRequest
from facli.run.placement import hardware_for, plan_run
from facli.run.runtime import Runtime


def runtime_dtype(request: BenchRequest) -> str:
    """auto: the checkpoint's, except bf16 for synthetic weights on GPUs (the usual serving dtype)."""
    if request.run.dtype != "auto" or request.synthetic is None:
        return request.run.dtype
    return "bf16" if resolve_device(request.run.device).type == "cuda" else "auto"


def bench_rank(parallel: ParallelContext, request: BenchRequest) -> dict:
    """One tensor-parallel rank's part: plan for the first depth, load once, then every depth.
    Each rank plans on the hardware it detects itself. Rank 0's dict is the result."""
    resolved = resolve(request)
    log = parallel.is_writer
    # Depths past the trained length are measured all the same.
    options = dataclasses.replace(request.run, dtype=runtime_dtype(request), allow_ctx_extension=True)
    ctx = options.ctx or request.depths[0]
    progress(f"loading {resolved.name} on {parallel.world_size} rank(s)", log)
    check_context(resolved.config, ctx, options.allow_ctx_extension, warn=False)
    hardware = hardware_for(resolve_device(options.device, parallel), options.hardware)
    plan = plan_run(resolved.config, resolved.name, hardware, options, ctx=ctx,
                    world_size=parallel.world_size, batch=options.batch or 1)
    runtime = Runtime(resolved, options, parallel, plan=plan, hardware=hardware)
    prompt = prompt_ids(runtime.encode, prompt_length(request.depths[-1], request.decode_tokens))
    result = {
        "model": resolved.name, "synthetic": resolved.synthetic,
        "dtype": str(runtime.dtype).removeprefix("torch."), "device": runtime.device.type,
        "load_s": runtime.load_s, "decode_bytes": decode_bytes(runtime),
        "depths": [],
        "prompt_ids": prompt if parallel.is_writer else None,  # for the baseline; not reported
    }
    for depth in request.depths:
        record = measure_depth(runtime, depth, prompt, request)
        result["depths"].append(record)
        progress(describe_facli(record), log)
    device = runtime.device
    del runtime
    release_memory(device)
    return result


def measure_depth(runtime, depth: int, prompt: list[int], request: BenchRequest) -> dict:
    """Re-plan for `depth`, warm up, then one measured generate (with rows: one generate_rows
    of a prompt per row); failures become a status."""
    n = prompt_length(depth, request.decode_tokens)
    record = {"depth": depth, "prompt_tokens": n, "status": "ok", "error": None, "plan": None}

    def plan_for_depth():
        context = request.run.ctx or depth
        rows = request.run.batch or rank_zeros(runtime, runtime.resident_rows(context))
        record["rows"] = rows
        # One --ctx and --batch: one store for every depth.
        if runtime.plan is None or (runtime.ctx, runtime.rows) != (context, rows):
            check_context(runtime.config, context, True, warn=False)
            runtime.reshape(ctx=context, rows=rows)
        larger = request.run.ctx is not None and runtime.plan is not None
        record["plan"] = plan_record(runtime.plan, prompt_prediction(runtime, n) if larger else None)

    def run():
        warm_up(runtime, n)
        if runtime.rows > 1:
            return measure_rows(runtime, prompt[:n], request.decode_tokens)
        generated = runtime.generate(prompt[:n], max_new_tokens=request.decode_tokens,
                                     sampling=GREEDY, ignore_eos=True)
        return {"new_tokens": len(generated.token_ids), "ttft_s": generated.ttft_s,
                "decode_tokens_per_s": generated.decode_tokens_per_s,
                "peak_gpu_bytes": generated.peak_gpu_bytes}

    attempt(plan_for_depth, record, runtime)
    generated = None
    if all_ranks_ok(runtime, record["status"] == "ok"):
        generated = attempt(run, record, runtime)
    elif record["status"] == "ok":
        record.update(status="error", error="another rank could not set up this depth")
    record.update(rank_figures(runtime, generated))
    if generated is not None:
        ttft = generated["ttft_s"]
        record.update(
            rows=runtime.rows, new_tokens=generated["new_tokens"], ttft_s=ttft,
            prefill_tokens_per_s=n * runtime.rows / ttft if ttft > 0 else None,
            decode_tokens_per_s=generated["decode_tokens_per_s"],
        )
    return record


def rank_zeros(runtime, value: int) -> int:
    """Rank 0's value on every rank: each rank plans on the free memory it detected itself, and
    all must run the same rows."""
    agreed = torch.tensor([value], dtype=torch.long, device=runtime.device)
    return int(broadcast_tokens(agreed, runtime.parallel)[0])


def measure_rows(runtime, ids: list[int], new_tokens: int) -> dict:
    """The prompt in every row of the runtime's cache: each prefilled in turn, then all decoded
    together. TTFT is the last row's (every prefill), decode tokens/s counts every row's."""
    # Warm-up: the decode graph of every row (a step of the batch) captured outside the timing.
    every_row(runtime, [65] * 16, WARM_UP_NEW_TOKENS[runtime.device.type])
    if runtime.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(runtime.device)
    lengths = []
    stats = every_row(runtime, ids, new_tokens,
                      on_done=lambda request, result: lengths.append(len(result.token_ids)))
    peak = torch.cuda.max_memory_allocated(runtime.device) if runtime.device.type == "cuda" else None
    return {"new_tokens": min(lengths), "ttft_s": stats.prefill_s,
            "decode_tokens_per_s": stats.decode_tokens_per_s, "peak_gpu_bytes": peak}


def every_row(runtime, ids: list[int], new_tokens: int, on_done=lambda *_: None):
    """`ids` in each row of the runtime's cache, greedy to `new_tokens`: batching.BatchStats."""
    queue = [RowRequest(ids, new_tokens, key=row) for row in range(runtime.rows)]
    return runtime.generate_rows(lambda: queue.pop() if queue else None, on_done,
                                 sampling=GREEDY, ignore_eos=True)


def attempt(step, record: dict, runtime):
    """step() or None, with out of memory (one rank only) and user errors noted in `record`."""
    out_of_memory = False
    try:
        return step()
    except torch.cuda.OutOfMemoryError:
        if runtime.parallel.is_distributed:
            raise  # the other ranks wait in a collective: let the launcher end them all
        out_of_memory = True
    except OutOfMemoryPlanError as error:
        record.update(status=DOES_NOT_FIT, error=str(error))
    except FacliError as error:
        record.update(status="error", error=str(error))
    if out_of_memory:  # outside the handler: its traceback no longer pins the activations
        record.update(status=OUT_OF_MEMORY, error=OUT_OF_MEMORY)
        release_memory(runtime.device)
    return None


def all_ranks_ok(runtime, ok: bool) -> bool:
    """True when every rank says ok (one collective), so that no rank runs a depth alone."""
    failures = torch.tensor([0 if ok else 1], dtype=torch.int64, device=runtime.device)
    return int(all_reduce_sum(failures, runtime.parallel)[0]) == 0


def warm_up(runtime, prompt_tokens: int) -> None:
    """Compile kernels and capture the decode graph for this depth outside the measurement: a
    full prefill chunk and then a chunk as long as the measured prompt's last one."""
    chunk = runtime.plan.prefill_chunk if runtime.plan is not None else runtime.prefill_chunk
    tail = prompt_tokens % chunk or chunk
    length = min(prompt_tokens, chunk + tail) if prompt_tokens > chunk else prompt_tokens
    runtime.generate([65] * length, max_new_tokens=WARM_UP_NEW_TOKENS[runtime.device.type],
                     sampling=GREEDY, ignore_eos=True)


def rank_figures(runtime, generated) -> dict:
    """Per-rank peak GPU bytes, host KV bytes and process RSS, gathered from every rank."""
    parallel = runtime.parallel
    peak = generated["peak_gpu_bytes"] if generated is not None and generated["peak_gpu_bytes"] else -1
    host_kv = runtime.kv.host_bytes() if hasattr(runtime.kv, "host_bytes") else 0
    rss = psutil.Process().memory_info().rss
    table = torch.zeros(3, parallel.world_size, dtype=torch.int64, device=runtime.device)
    table[:, parallel.rank] = torch.tensor([peak, host_kv, rss], dtype=torch.int64)
    all_reduce_sum(table, parallel)
    peaks, host, rss_all = table.tolist()
    measured = None if all(p < 0 for p in peaks) else [p if p >= 0 else None for p in peaks]
    return {"peak_gpu_bytes": measured, "host_kv_bytes": sum(host), "host_rss_bytes": sum(rss_all)}


def prompt_prediction(runtime, prompt_tokens: int) -> dict:
    """The time model's TTFT, prefill and decode figures for this prompt on the runtime plan's
    placement (the plan's own are for a prompt that fills its context)."""
    prediction = runtime.predict_prompt(prompt_tokens)
    ttft, tokens = prediction.ttft_s, runtime.plan.batch * prompt_tokens  # every row's prompt
    return {"ttft_s": ttft, "prefill_tokens_per_s": tokens / ttft if ttft else None,
            "decode_tokens_per_s": prediction.decode_tokens_per_s,
            "decode_mode": prediction.decode_mode, "packed": prediction.packed}


def plan_record(plan, for_prompt: dict | None = None) -> dict | None:
    """The plan's predictions for the current context (None until the runtime carries a plan).
    With for_prompt (prompt_prediction), the plan is for a larger context than the measured
    prompt: its figures are the prompt's, and the context's own are kept beside them (ctx_*)."""
    if plan is None:
        return None
    timing = plan.timing
    record = {
        "peak_gpu_bytes": [d.peak_bytes for d in plan.devices],
        "ttft_s": timing.ttft_s,
        "prefill_tokens_per_s": (plan.batch * plan.ctx / timing.prefill_s
                                 if timing.prefill_s else None),
        "decode_tokens_per_s": timing.decode_tokens_per_s,
        "host_kv_bytes": plan.host.kv_bytes,
        "host_layers": len(plan.host.layers),
        "kv_dtype": plan.kv_dtype,
        "decode_mode": plan.decode_mode,
        "summary": plan.summary_line(),
        "plan": plan.to_dict(),
    }
    if for_prompt is not None:
        record.update({f"ctx_{key}": record[key] for key in for_prompt if key in record},
                      **for_prompt)
    return record


def decode_bytes(runtime) -> dict:
    """Bytes one rank reads per decode step: weights (an embedding row aside) and KV per token."""
    config = runtime.config
    weights = 0
    for name, param in runtime.model.named_parameters():
        if "embed_tokens" in name and not config.tie_word_embeddings:
            continue
        weights += param.numel() * param.element_size()
    return {
        "weights_per_rank": weights,
        "kv_elements_per_token_per_rank": config.kv_bytes_per_token // runtime.parallel.world_size,
        "kv_element_bytes": runtime.dtype.itemsize,  # a plan with kv_dtype fp8 stores 1
    }


def describe_facli(record: dict) -> str:
    if record["status"] != "ok":
        return f"depth {record['depth']}: facli {record['error']}"
    peaks = [p for p in record["peak_gpu_bytes"] or [] if p is not None]
    peak = f", peak {max(peaks) / 2**30:.1f} GiB" if peaks else ""
    plan = record["plan"]
    if plan is not None:
        ttft = "unknown" if plan["ttft_s"] is None else f"{plan['ttft_s']:.2f} s"
        peak += f" (plan {max(plan['peak_gpu_bytes']) / 2**30:.1f} GiB, TTFT {ttft})"
    rows = f" ({record['rows']} rows)" if record.get("rows", 1) > 1 else ""
    decode = record["decode_tokens_per_s"]  # None: fewer than two decode steps ran
    decode = "not measured" if decode is None else f"{decode:.1f} tok/s"
    return (f"depth {record['depth']}{rows}: facli TTFT {record['ttft_s']:.2f} s, prefill "
            f"{record['prefill_tokens_per_s']:.0f} tok/s, decode {decode}{peak}")
