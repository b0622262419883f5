"""The planner: model + hardware + context -> the fastest Plan that fits (pure, no devices).

It searches the tensor-parallel degree, the prefill chunk and the KV split between GPU and
pinned host memory (for each TP degree and chunk, as many layers on the GPU as fit: host
layers only ever cost time), and every decode mode for host layers. Candidates are ranked
by predicted prefill time plus `new_tokens` decode steps.
"""

from dataclasses import dataclass, replace

from facli.errors import FacliError, OutOfMemoryPlanError
from facli.models.config import ModelConfig
from facli.planner.build import build_plan
from facli.planner.candidates import (
    Candidate,
    evaluate,
    evaluate_cpu,
    fits_memory,
    resolve_dtypes,
    tp_choices,
)
from facli.planner.hardware import HardwareSpec
from facli.planner.memory import DTYPE_BYTES
from facli.planner.plan import Plan
from facli.planner.policy import gpus_read_fp8, holds_rows
from facli.planner.time_model import (
    Layout,
    decode_breakdown,
    packs_slots,
    prefill_breakdown,
    unknown_time,
)
from facli.units import MAX_CTX, check_count, format_bytes, format_ctx

CHUNK_CHOICES = (256, 512, 1024, 2048, 4096, 8192, 16384)
DECODE_MODE_CHOICES = ("auto", "prefetch", "cpu", "split")


@dataclass(frozen=True)
class PlanOptions:
    """Choices the user may fix; None or "auto" lets the planner search."""

    kv_dtype: str = "auto"  # auto: the weight dtype; or bf16, fp16, fp32, fp8
    weight_dtype: str = "auto"  # auto: the checkpoint's (fp32 checkpoints run bf16 on GPUs)
    devices: int | None = None  # TP degree; None searches 1..GPU count
    prefill_chunk: int | None = None
    decode_mode: str = "auto"  # for host-resident layers: auto, prefetch, cpu or split
    allreduce_tile_tokens: int | None = None
    safety_margin: str | int | None = None  # None: the hardware spec's; "5%", "2GiB", bytes
    new_tokens: int = 256  # decode steps weighed against prefill when ranking
    force: bool = False  # return the least-short plan (fits=False) instead of raising
    model_name: str = "model"

    def __post_init__(self):
        check_decode_mode(self.decode_mode)
        for name in ("devices", "prefill_chunk", "allreduce_tile_tokens"):
            check_count(getattr(self, name), f"--{name.replace('_', '-')}", optional=True)
        check_count(self.new_tokens, "--max-new-tokens", low=0)


def check_decode_mode(mode: str) -> None:
    """Raise a FacliError unless `mode` is a --decode-mode choice."""
    if mode not in DECODE_MODE_CHOICES:
        raise FacliError(f"expected --decode-mode one of {', '.join(DECODE_MODE_CHOICES)}, "
                         f"got {mode!r}")


def _ranking(candidate: Candidate) -> tuple:
    """Fastest first; among equals the fewest ranks and the largest chunk."""
    return candidate.total_s, candidate.tp, -candidate.chunk


def _chunk_choices(ctx: int, options: PlanOptions) -> list[int]:
    if options.prefill_chunk is not None:
        return [min(options.prefill_chunk, ctx)]
    choices = [c for c in CHUNK_CHOICES if c < ctx] + [min(ctx, CHUNK_CHOICES[-1])]
    return sorted(set(choices))


def _mode_choices(options: PlanOptions) -> tuple[str, ...]:
    return DECODE_MODE_CHOICES[1:] if options.decode_mode == "auto" else (options.decode_mode,)


def _check_inputs(model: ModelConfig, ctx: int, batch: int) -> None:
    check_count(ctx, "--ctx", high=MAX_CTX)
    check_count(batch, "--batch")


def _margin_applied(hardware: HardwareSpec, options: PlanOptions) -> HardwareSpec:
    if options.safety_margin is None:
        return hardware
    return hardware.with_margin(options.safety_margin)


def candidates(model: ModelConfig, hardware: HardwareSpec, ctx: int, batch: int,
               options: PlanOptions) -> list[Candidate]:
    """Every placement considered, fitting or not, with its memory and predicted time."""
    weight_dtype, kv_dtype, _ = resolve_dtypes(model, hardware, options)
    chunks = _chunk_choices(ctx, options)
    if hardware.num_gpus == 0:
        tps = [options.devices or 1]
        return [evaluate_cpu(model, hardware, ctx, batch, tp, chunk, weight_dtype, kv_dtype,
                             options) for tp in tps for chunk in chunks]
    found = []
    for tp in tp_choices(model, hardware, options.devices):
        for chunk in chunks:
            seen_resident = False
            for mode in _mode_choices(options):
                candidate = evaluate(model, hardware, ctx, batch, tp, chunk, mode,
                                     weight_dtype, kv_dtype, options)
                if candidate.decode_mode == "resident":
                    if seen_resident:
                        continue
                    seen_resident = True
                found.append(candidate)
    return found


def plan(model: ModelConfig, hardware: HardwareSpec, ctx: int, batch: int = 1,
         options: PlanOptions = PlanOptions()) -> Plan:
    """The fastest placement of `model` at `ctx` tokens x `batch` sequences that fits.

    Raises OutOfMemoryPlanError (one line: needs, has, short by, the largest context that
    fits) when nothing fits, unless options.force, which returns the least-short plan with
    fits=False.
    """
    _check_inputs(model, ctx, batch)
    hardware = _margin_applied(hardware, options)
    found = candidates(model, hardware, ctx, batch, options)
    fitting = [c for c in found if c.fits]
    if fitting:
        best = min(fitting, key=_ranking)
    elif options.force:
        best = min(found, key=lambda c: (c.shortfall_bytes, c.total_s))
    else:
        raise OutOfMemoryPlanError(_no_fit_message(model, hardware, ctx, batch, options, found))
    _, _, notes = resolve_dtypes(model, hardware, options)
    hints = _fp8_hint(model, hardware, ctx, batch, options, best)
    return build_plan(model, hardware, ctx, batch, options, best, found, notes + hints)


# How the planner's hints at an fp8 cache start (offload layers kept on the GPU, or more rows).
FP8_HINT = "hint: --kv-dtype fp8 (e4m3 with a scale per token and head, lossy) would keep"


def _fp8_hint(model: ModelConfig, hardware: HardwareSpec, ctx: int, batch: int,
              options: PlanOptions, best: Candidate) -> tuple[str, ...]:
    """A line naming --kv-dtype fp8 when the KV dtype was left to the planner, some KV goes to
    host memory, and an fp8 cache would be faster. fp8 is lossy, so it is never chosen alone."""
    if not best.host_layers or options.kv_dtype != "auto" or not best.fits:
        return ()
    fp8 = [c for c in candidates(model, hardware, ctx, batch, replace(options, kv_dtype="fp8"))
           if c.fits]
    if not fp8:
        return ()
    alt = min(fp8, key=_ranking)
    if alt.total_s >= best.total_s:
        return ()
    where = (f"all {alt.gpu_layers} layers' KV on the GPU" if not alt.host_layers
             else f"{alt.host_layers} layers' KV on host instead of {best.host_layers}")
    return (f"{FP8_HINT} {where}: decode {batch / alt.times['decode_step_s']:.1f} tokens/s "
            f"against {batch / best.times['decode_step_s']:.1f}, time to first token "
            f"{alt.times['prefill_s']:.1f} s against {best.times['prefill_s']:.1f} s",)


# The most rows an automatic choice takes (summarize, bench --batch auto, plan-memory --batch
# auto); each row holds a whole context of KV.
MOST_ROWS = 64
# Rows hint at an fp8 cache only for this much more decode throughput (ratio): fp8 is lossy,
# and the bar stays above the time model's error for rows (docs/calibration.md).
FP8_ROWS_HINT_GAIN = 1.10


@dataclass(frozen=True)
class PromptPrediction:
    """The time model's figures for one prompt on a plan's placement, and the host layers'
    decode mode (with its CPU share) that gives them. The figures are None where a term of the
    time model is unknown for the placement; `unknown` then says why."""

    ttft_s: float | None
    decode_tokens_per_s: float | None
    decode_mode: str
    cpu_share: float
    packed: bool = False  # every host layer's rows fit the staging slots: none crosses PCIe
    unknown: str = ""


def predict_prompt(model: ModelConfig, hardware: HardwareSpec, run_plan: Plan,
                   prompt_tokens: int, *, choose_mode: bool = False,
                   batch: int | None = None) -> PromptPrediction:
    """Predictions for a prompt of `prompt_tokens` on `run_plan`'s placement; the plan's own
    figures are for a prompt that fills its context. With choose_mode and host layers, the
    fastest decode mode for this prompt: every mode runs on the plan's KV store, and the best
    at one length is not at another (a short prompt's host rows cross PCIe faster than the CPU
    and the GPU can take turns). cpu_share is "split" mode's share for this prompt. batch:
    sequences of that length (default the plan's), prefilled one after another and decoded
    together."""
    batch = batch or run_plan.batch
    modes = DECODE_MODE_CHOICES[1:] if choose_mode and run_plan.host.layers else (run_plan.decode_mode,)
    best = None
    for mode in modes:
        layout = Layout(model, prompt_tokens, batch, run_plan.tp, run_plan.prefill_chunk,
                        run_plan.allreduce_tile_tokens, len(run_plan.host.layers), mode,
                        DTYPE_BYTES[run_plan.weight_dtype], DTYPE_BYTES[run_plan.kv_dtype],
                        on_cpu=run_plan.device_kind == "cpu", capacity=run_plan.ctx)
        times = decode_breakdown(hardware, layout)
        if best is None or times["decode_step_s"] < best[0]["decode_step_s"]:
            best = times, layout
    times, layout = best
    unknown = unknown_time(hardware, layout)
    if unknown:
        return PromptPrediction(None, None, layout.decode_mode, 0.0, unknown=unknown)
    return PromptPrediction(prefill_breakdown(hardware, layout)["prefill_s"],
                            batch / times["decode_step_s"], layout.decode_mode,
                            times["decode_host_cpu_share"], packs_slots(layout))


def largest_resident_batch(model: ModelConfig, hardware: HardwareSpec, ctx: int,
                           options: PlanOptions = PlanOptions(), limit: int = MOST_ROWS) -> int:
    """The most sequences of `ctx` tokens, up to `limit`, whose plan keeps the whole KV cache
    in device memory (so they decode together as rows of one cache, policy.holds_rows); 1 when
    not even two fit. Binary search: such a fit is monotone in the batch."""
    # resident(1) is taken as true, resident(limit + 1) as false
    return _largest_holding(lambda rows: _resident(model, hardware, ctx, rows, options), 1, limit + 1)


def _resident(model: ModelConfig, hardware: HardwareSpec, ctx: int, batch: int,
              options: PlanOptions) -> bool:
    """Whether `batch` sequences of `ctx` tokens have a plan that holds them as rows."""
    try:
        found = plan(model, hardware, ctx, batch, replace(options, force=False))
    except OutOfMemoryPlanError:
        return False
    return holds_rows(found.decode_mode, found.kv_dtype == "fp8",
                      gpus_read_fp8(hardware.devices[:found.tp]))


def with_fp8_rows_hint(model: ModelConfig, hardware: HardwareSpec, run_plan: Plan,
                       options: PlanOptions) -> Plan:
    """run_plan for rows (several sequences decoded together) with a hint naming --kv-dtype fp8
    when the KV dtype was left to the planner, the GPUs' decode kernel reads fp8, the rows
    fill the GPUs with the weights' dtype, and an fp8 cache holds more rows whose steps make
    FP8_ROWS_HINT_GAIN times the tokens per second or more. fp8 is lossy, so it is never
    chosen alone."""
    if (run_plan.batch == 1 or options.kv_dtype != "auto" or run_plan.device_kind != "cuda"
            or not gpus_read_fp8(hardware.devices[:run_plan.tp])):
        return run_plan
    ctx, batch = run_plan.ctx, run_plan.batch
    if _resident(model, hardware, ctx, batch + 1, options):
        return run_plan  # more rows of this cache fit: --batch auto comes first
    fp8_options = replace(options, kv_dtype="fp8", force=False)
    rows = largest_resident_batch(model, hardware, ctx, fp8_options)
    if rows <= batch:
        return run_plan
    alt = plan(model, hardware, ctx, rows, fp8_options)
    if alt.timing.decode_tokens_per_s < FP8_ROWS_HINT_GAIN * run_plan.timing.decode_tokens_per_s:
        return run_plan
    hint = (f"{FP8_HINT} {rows} rows of ctx {format_ctx(ctx)} on the GPUs: decode "
            f"{alt.timing.decode_tokens_per_s:.1f} tokens/s against "
            f"{run_plan.timing.decode_tokens_per_s:.1f} for these {batch}")
    return replace(run_plan, explanation=run_plan.explanation + (hint,))


def fits_anywhere(model: ModelConfig, hardware: HardwareSpec, ctx: int, batch: int,
                  options: PlanOptions) -> bool:
    """Whether any TP degree fits `ctx` at the smallest chunk tried (memory only)."""
    weight_dtype, kv_dtype, _ = resolve_dtypes(model, hardware, options)
    chunk = min(_chunk_choices(ctx, options))
    tps = [options.devices or 1] if hardware.num_gpus == 0 else tp_choices(
        model, hardware, options.devices)
    return any(fits_memory(model, hardware, ctx, batch, tp, chunk, weight_dtype, kv_dtype)
               for tp in tps)


def largest_fitting_ctx(model: ModelConfig, hardware: HardwareSpec, batch: int = 1,
                        options: PlanOptions = PlanOptions(), upper: int = 1 << 24) -> int:
    """The largest context (tokens) with some placement that fits; 0 if none does.

    Binary search on memory alone (fitting is monotone in the context length)."""
    hardware = _margin_applied(hardware, options)
    if not fits_anywhere(model, hardware, 1, batch, options):
        return 0
    if fits_anywhere(model, hardware, upper, batch, options):
        return upper
    return _largest_holding(lambda ctx: fits_anywhere(model, hardware, ctx, batch, options), 1, upper)


def _largest_holding(holds, low: int, high: int) -> int:
    """The largest n in [low, high) for which the monotone `holds` is true, given that it holds
    at low and not at high (binary search)."""
    while high - low > 1:
        middle = (low + high) // 2
        if holds(middle):
            low = middle
        else:
            high = middle
    return low


def _no_fit_message(model: ModelConfig, hardware: HardwareSpec, ctx: int, batch: int,
                    options: PlanOptions, found: list[Candidate]) -> str:
    on_device = [c for c in found if c.short_on != "device"]
    closest = min(on_device or found, key=lambda c: c.shortfall_bytes)
    largest = largest_fitting_ctx(model, hardware, batch, options, upper=ctx)
    where = (f"per GPU ({closest.tp} of {hardware.num_gpus} GPUs)" if hardware.num_gpus
             else "of host memory")
    if closest.short_on == "host":
        where = "of pinned host memory"
    fits_line = (f"the largest context that fits here is {largest} tokens ({_ctx_words(largest)})"
                 if largest else "nothing fits here even at 1 token")
    return (
        f"expected {options.model_name} at ctx {format_ctx(ctx)} x batch {batch} to fit on "
        f"{hardware.name}, got a need of {format_bytes(closest.need_bytes)} {where} with "
        f"{format_bytes(closest.has_bytes)} available: short by "
        f"{format_bytes(closest.shortfall_bytes)} ({closest.describe()}); {fits_line}; "
        f"{_no_fit_remedies(model, hardware, ctx, batch, options)}"
    )


def _no_fit_remedies(model: ModelConfig, hardware: HardwareSpec, ctx: int, batch: int,
                     options: PlanOptions) -> str:
    """What to change, naming --kv-dtype fp8 only where it would make this context fit."""
    lower = "lower --ctx or --batch" if batch > 1 else "lower --ctx"
    more = _more_gpus(hardware, options)
    if options.kv_dtype != "auto" or hardware.num_gpus == 0:
        return f"{lower}, or {more}"
    fp8 = replace(options, kv_dtype="fp8")
    if fits_anywhere(model, hardware, ctx, batch, fp8):
        return f"{lower}, use --kv-dtype fp8 (it fits; e4m3, half the KV bytes, lossy), or {more}"
    largest = largest_fitting_ctx(model, hardware, batch, fp8, upper=ctx)
    return (f"{lower} (with --kv-dtype fp8, up to {largest} tokens, {_ctx_words(largest)}), "
            f"or {more}")


def _more_gpus(hardware: HardwareSpec, options: PlanOptions) -> str:
    """Bigger hardware, said so that any command can act on it: only plan-memory (and summarize
    --plan-only) take --hardware, so it is named as plan-memory's."""
    recipe = "`facli plan-memory --hardware NAME` plans for a hardware recipe"
    if options.devices is not None and options.devices < hardware.num_gpus:
        return f"use more of the {hardware.num_gpus} GPUs (--devices), or larger ones ({recipe})"
    return f"run on more or larger GPUs ({recipe})"


def _ctx_words(tokens: int) -> str:
    if tokens >= 1024:
        return f"{tokens / 1024:.1f}k".replace(".0k", "k")
    return str(tokens)
