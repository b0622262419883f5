"""What `facli plan-memory` shows: the plan for a model at a context on a hardware spec (where
weights, KV cache and activations go, and how long it should take), why generate and summarize
would refuse that context, whether rows can run the plan, and the plan as a table. Pure: no
devices, no weights."""

from dataclasses import dataclass

from facli.errors import FacliError
from facli.models.config import ModelConfig
from facli.models.resolve import check_context
from facli.planner.hardware import HardwareSpec
from facli.planner.plan import Plan
from facli.planner.policy import gpus_read_fp8, holds_rows
from facli.planner.search import PlanOptions, largest_resident_batch, plan, with_fp8_rows_hint
from facli.units import format_bytes, format_ctx


@dataclass(frozen=True)
class MemoryPlan:
    plan: Plan
    refusal: str | None  # why generate and summarize would refuse the context (run_refusal)
    config: ModelConfig
    hardware: HardwareSpec
    options: PlanOptions


def plan_memory(config: ModelConfig, name: str, hardware: HardwareSpec, ctx: int,
                rows: int | None, *, devices: int | None, dtype: str, kv_dtype: str,
                prefill_chunk: int | None, decode_mode: str, allreduce_tile_tokens: int | None,
                allow_ctx_extension: bool) -> MemoryPlan:
    """The plan for `rows` sequences of `ctx` tokens (None: as many as keep the KV cache on the
    devices) on `devices` ranks (None: the planner's choice), with --kv-dtype fp8 hinted where
    it holds clearly faster rows."""
    options = PlanOptions(kv_dtype=kv_dtype, weight_dtype=dtype, devices=devices,
                          prefill_chunk=prefill_chunk, decode_mode=decode_mode,
                          allreduce_tile_tokens=allreduce_tile_tokens, model_name=name)
    refusal = run_refusal(config, ctx, allow_ctx_extension)
    if rows is None:
        rows = largest_resident_batch(config, hardware, ctx, options)
    result = with_fp8_rows_hint(config, hardware, plan(config, hardware, ctx, rows, options),
                                options)
    return MemoryPlan(result, refusal, config, hardware, options)


def describe(memory: MemoryPlan) -> str:
    """The readable table of the plan, with the note on rows under its verdict."""
    return render(memory.plan, rows_note(memory.config, memory.hardware, memory.plan,
                                         memory.options))


def run_refusal(config, ctx: int, allow_ctx_extension: bool) -> str | None:
    """Why a run (generate, summarize) would refuse this context, by the check they make
    (facli.models.resolve.check_context); None where it would run."""
    try:
        check_context(config, ctx, allow_ctx_extension, warn=False)
    except FacliError as refused:
        return str(refused)
    return None


def rows_note(config, spec, result: Plan, options: PlanOptions) -> str | None:
    """For a batch, whether facli's rows (summarize --batch, bench --batch) can run this plan:
    they need the whole KV cache on the GPUs; if it is not, how many rows keep it there."""
    if result.batch == 1:
        return None
    reads_fp8 = gpus_read_fp8(spec.devices[:result.tp])
    if holds_rows(result.decode_mode, result.kv_dtype == "fp8", reads_fp8):
        where = "on the GPUs" if result.device_kind == "cuda" else "in memory"
        return (f"rows: the {result.batch} sequences decode together from one cache {where} "
                "(summarize --batch, bench --batch)")
    most = largest_resident_batch(config, spec, result.ctx, options, limit=result.batch - 1)
    fit = (f"up to {most} rows keep it there at ctx {format_ctx(result.ctx)}" if most > 1 else
           f"not even 2 rows keep it there at ctx {format_ctx(result.ctx)}")
    return (f"rows: summarize --batch and bench --batch decode sequences together only with the "
            f"whole KV cache on the GPUs, which this plan does not keep; {fit}")


def render(result: Plan, note: str | None = None) -> str:
    """The readable table of a plan, with `note` (rows_note) under its verdict."""
    lines = [
        f"{result.model}: ctx {format_ctx(result.ctx)} x batch {result.batch} on "
        f"{result.hardware} (weights {result.weight_dtype}, KV {result.kv_dtype})",
        "",
    ]
    header = ("device", "weights", "KV", "staging", "activations", "comm+work", "peak",
              "budget", "free")
    rows = [header]
    for d in result.devices:
        label = f"{d.kind}:{d.index}" if d.kind == "cuda" else f"cpu rank {d.index}"
        rows.append((label, *(format_bytes(v) for v in (
            d.weights_bytes, d.kv_bytes, d.kv_staging_bytes, d.activation_bytes,
            d.comm_bytes + d.workspace_bytes, d.peak_bytes, d.budget_bytes, d.free_bytes))))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines += ["  ".join(cell.rjust(w) if i else cell.ljust(w)
                        for i, (cell, w) in enumerate(zip(row, widths))) for row in rows]
    host = result.host
    host_layers = _layer_ranges(host.layers) or "none"
    lines += [
        f"host: KV offloaded {format_bytes(host.kv_bytes)} of {format_bytes(host.budget_bytes)} "
        f"pinnable (layers {host_layers})",
        f"GPU: {result.devices[0].name} x {result.tp}" if result.device_kind == "cuda"
        else "CPU-only plan: no GPU in the hardware spec",
        "",
        f"tensor parallel {result.tp}, prefill chunk {result.prefill_chunk} tokens, "
        + (f"AllReduce tile {result.allreduce_tile_tokens} tokens, " if result.tp > 1 else "")
        + f"decode mode {result.decode_mode}",
        f"predicted: time unknown ({result.timing.unknown})" if result.timing.unknown else
        f"predicted: {result.prefill_phrase} {result.timing.ttft_s:.2f} s, decode "
        f"{result.timing.decode_tokens_per_s:.1f} tokens/s ({result.timing.decode_step_s * 1e3:.1f} "
        "ms per step)",
        "fits" if result.fits else "DOES NOT FIT",
        *([note] if note else []),
        "",
        "why:",
    ]
    lines += [f"  - {line}" for line in result.explanation]
    return "\n".join(lines)


def _layer_ranges(layers: tuple[int, ...]) -> str:
    """(0, 1, 2, 5) -> '0-2, 5'."""
    parts, start = [], None
    for i, layer in enumerate(layers):
        if start is None:
            start = layer
        if i + 1 == len(layers) or layers[i + 1] != layer + 1:
            parts.append(str(start) if start == layer else f"{start}-{layer}")
            start = None
    return ", ".join(parts)
