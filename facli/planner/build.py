"""Turn the chosen candidate into a Plan: layer lists, per-device bytes, timing, explanation."""

from facli.models.config import ModelConfig
from facli.planner.candidates import Candidate, resolve_dtypes
from facli.planner.hardware import HardwareSpec
from facli.planner.memory import reserved_outside_allocator
from facli.planner.plan import DevicePlan, HostPlan, Plan, Timing
from facli.planner.policy import (
    packed_slot_rows,
    prefills_in_waves,
    splits_into_tiles,
    sums_with_copy_engines,
    uses_offloaded_store,
)
from facli.planner.time_model import CPU_FP8_ATTENTION_SHARE
from facli.units import format_bytes, format_ctx


def host_layer_indices(num_layers: int, host_layers: int) -> tuple[int, ...]:
    """Host-resident layers spread evenly (ending at the last layer), so that GPU-resident
    layers between them give each prefetch compute to hide behind."""
    if host_layers == 0:
        return ()
    return tuple(sorted({num_layers - 1 - (i * num_layers) // host_layers
                         for i in range(host_layers)}))


def _devices(hardware: HardwareSpec, best: Candidate) -> tuple[DevicePlan, ...]:
    m = best.memory
    parts = dict(weights_bytes=m.weights, kv_bytes=m.kv, kv_staging_bytes=m.kv_staging,
                 activation_bytes=m.activations, comm_bytes=m.comm,
                 workspace_bytes=m.workspace, peak_bytes=m.total)
    if best.on_cpu:
        return tuple(
            DevicePlan(index=rank, kind="cpu", name="host", capacity_bytes=hardware.host_ram_bytes // best.tp,
                       reserved_bytes=0, margin_bytes=hardware.safety_margin_bytes // best.tp,
                       budget_bytes=best.budget_bytes, **parts)
            for rank in range(best.tp)
        )
    return tuple(
        DevicePlan(index=i, kind="cuda", name=hardware.devices[i].name,
                   capacity_bytes=hardware.devices[i].memory_bytes,
                   reserved_bytes=(hardware.devices[i].reserved_bytes
                                   + reserved_outside_allocator(best.tp)),
                   margin_bytes=hardware.safety_margin_bytes,
                   budget_bytes=hardware.gpu_budget_bytes(i) - reserved_outside_allocator(best.tp),
                   **parts)
        for i in range(best.tp)
    )


def _timing(best: Candidate, batch: int) -> Timing:
    if best.unknown:
        return Timing(prefill_s=None, ttft_s=None, decode_step_s=None, decode_tokens_per_s=None,
                      new_tokens=best.new_tokens, total_s=None, terms=(), unknown=best.unknown)
    times = best.times
    step = times["decode_step_s"]
    terms = tuple((k, float(v)) for k, v in sorted(times.items())
                  if k not in ("prefill_s", "decode_step_s", "decode_host_cpu_share"))
    return Timing(prefill_s=times["prefill_s"], ttft_s=times["prefill_s"], decode_step_s=step,
                  decode_tokens_per_s=batch / step if step > 0 else 0.0,
                  new_tokens=best.new_tokens, total_s=best.total_s, terms=terms)


def _kv_reason(model: ModelConfig, best: Candidate, hardware: HardwareSpec, ctx: int) -> str:
    layers = model.num_hidden_layers
    if not best.host_layers:
        where = "host memory (CPU-only plan)" if best.on_cpu else "the GPU"
        return f"KV: all {layers} layers on {where}; nothing is offloaded"
    layer = best.host_kv_bytes // max(best.host_layers, 1) // best.tp
    packed = packed_slot_rows(ctx, best.host_layers)
    kept = ("they keep the host layers' rows whole" if packed >= ctx else
            f"a prompt of up to {format_ctx(packed)} tokens keeps every host layer's rows there, "
            f"as fast as on the GPU")
    return (
        f"KV: {best.gpu_layers} of {layers} layers on the GPU (as many as fit), "
        f"{best.host_layers} in pinned host memory ({format_bytes(best.host_kv_bytes)} of "
        f"{format_bytes(best.host_budget_bytes)} pinnable); each needs "
        f"{format_bytes(layer)} per GPU, plus 2 layers of GPU staging for write-back and "
        f"prefetch: {kept}"
    )


def _mode_reason(best: Candidate, found: list[Candidate], hardware: HardwareSpec,
                 fp8_kv: bool) -> str | None:
    if not best.host_layers:
        return None
    others = [c for c in found if c.tp == best.tp and c.chunk == best.chunk and c.host_layers
              and c.decode_mode != best.decode_mode]
    text = (f"decode mode {best.decode_mode}: step {best.times['decode_step_s'] * 1e3:.1f} ms "
            f"(host KV {best.times['decode_host_kv_s'] * 1e3:.1f} ms against "
            f"{best.times['decode_device_s'] * 1e3:.1f} ms on the GPU)")
    share = best.times.get("decode_host_cpu_share", 0.0)
    if best.decode_mode == "split":
        text += f", the CPU attending {share:.0%} of each host layer's rows"
    if others:
        text += "; " + ", ".join(f"{c.decode_mode} would take {c.times['decode_step_s'] * 1e3:.1f} ms"
                                 for c in others)
        fp8_rows = (f", {hardware.cpu_attention_gbps * CPU_FP8_ATTENTION_SHARE:.1f} over fp8 rows"
                    if fp8_kv else "")
        text += (f" (PCIe {hardware.host_device_gbps:g} GB/s per GPU, CPU attention "
                 f"{hardware.cpu_attention_gbps:g} GB/s{fp8_rows}, host memory "
                 f"{hardware.cpu_memory_gbps:g} GB/s)")
    return text


def _rejected(best: Candidate, found: list[Candidate]) -> list[str]:
    lines = []
    for tp in sorted({c.tp for c in found} - {best.tp}):
        group = [c for c in found if c.tp == tp]
        fitting = [c for c in group if c.fits]
        if fitting:
            alt = min(fitting, key=lambda c: c.total_s)
            ratio = alt.total_s / best.total_s if best.total_s else float("inf")
            lines.append(f"rejected TP {tp}: fits ({alt.describe()}) but predicted "
                         f"{alt.total_s:.1f} s, {ratio:.2f}x the chosen plan")
        else:
            alt = min(group, key=lambda c: c.shortfall_bytes)
            lines.append(f"rejected TP {tp}: does not fit; needs {format_bytes(alt.need_bytes)} "
                         f"with {format_bytes(alt.has_bytes)} available ({alt.describe()})")
    return lines


def _explanation(model: ModelConfig, hardware: HardwareSpec, ctx: int, best: Candidate,
                 found: list[Candidate], notes: tuple[str, ...], fp8_kv: bool) -> tuple[str, ...]:
    fitting = [c for c in found if c.fits]
    ranked = (f"ranked by prefill + {best.new_tokens} decode steps" if not best.unknown else
              f"ranked by prefill + {best.new_tokens} decode steps at the calibrated CPU's rates, "
              f"since {best.unknown}")
    predicted = (f"predicted prefill {best.times['prefill_s']:.2f} s, decode step "
                 f"{best.times['decode_step_s'] * 1e3:.2f} ms" if not best.unknown
                 else "predicted time unknown")
    lines = [
        f"searched {len(found)} placements (TP {sorted({c.tp for c in found})}, chunks "
        f"{sorted({c.chunk for c in found})}, KV split, decode mode): {len(fitting)} fit; {ranked}",
        f"chosen: {best.describe()}; {predicted}",
        _kv_reason(model, best, hardware, ctx),
    ]
    mode = _mode_reason(best, found, hardware, fp8_kv)
    if mode:
        lines.append(mode)
    same_tp = [c for c in fitting if c.tp == best.tp and c.chunk != best.chunk]
    if same_tp and not best.unknown:
        alt = min(same_tp, key=lambda c: c.total_s)
        lines.append(f"prefill chunk {best.chunk}: the next best chunk, {alt.chunk}, predicts "
                     f"{alt.total_s:.2f} s in all against {best.total_s:.2f} s")
    if best.tp > 1:
        if not splits_into_tiles(best.chunk, best.tile_tokens):
            how = "one all_reduce per projection"
        elif sums_with_copy_engines(best.tp, on_gpu=not best.on_cpu):
            how = f"tiles of {best.tile_tokens} tokens summed by the copy engines"
        elif prefills_in_waves(best.tp, on_gpu=not best.on_cpu,
                               offloaded_store=uses_offloaded_store(best.decode_mode, fp8_kv)):
            how = "each chunk in two waves, each half's all_reduce beside the other half's compute"
        else:
            how = f"tiles of {best.tile_tokens} tokens"
        lines.append(f"tiling-AllReduce: {how} ({hardware.inter_gpu_gbps:g} GB/s, "
                     f"{hardware.allreduce_latency_us:g} us per call); exposed comm "
                     f"{best.times['prefill_comm_exposed_s']:.2f} s")
    lines.extend(_rejected(best, found))
    lines.extend(notes)
    if model.sliding_window is not None and ctx > model.sliding_window:
        lines.append(f"note: the model's sliding_window is {model.sliding_window} < ctx "
                     f"{format_ctx(ctx)}; facli runs full attention, so generate refuses this ctx")
    if not best.fits:
        lines.append(f"DOES NOT FIT: needs {format_bytes(best.need_bytes)}, has "
                     f"{format_bytes(best.has_bytes)}, short by {format_bytes(best.shortfall_bytes)}")
    return tuple(lines)


def build_plan(model: ModelConfig, hardware: HardwareSpec, ctx: int, batch: int, options,
               best: Candidate, found: list[Candidate], notes: tuple[str, ...]) -> Plan:
    weight_dtype, kv_dtype, _ = resolve_dtypes(model, hardware, options)
    layers = model.num_hidden_layers
    host_layers = host_layer_indices(layers, best.host_layers)
    gpu_layers = tuple(i for i in range(layers) if i not in set(host_layers))
    return Plan(
        model=options.model_name,
        hardware=hardware.name,
        ctx=ctx,
        batch=batch,
        weight_dtype=weight_dtype,
        kv_dtype=kv_dtype,
        tp=best.tp,
        device_kind="cpu" if best.on_cpu else "cuda",
        devices=_devices(hardware, best),
        gpu_layers=gpu_layers,
        host=HostPlan(ram_bytes=hardware.host_ram_bytes, budget_bytes=best.host_budget_bytes,
                      kv_bytes=best.host_kv_bytes, layers=host_layers,
                      packed_prompt_tokens=packed_slot_rows(ctx, len(host_layers))),
        prefill_chunk=best.chunk,
        allreduce_tile_tokens=best.tile_tokens,
        decode_mode=best.decode_mode,
        host_cpu_share=best.times.get("decode_host_cpu_share", 0.0),
        timing=_timing(best, batch),
        fits=best.fits,
        explanation=_explanation(model, hardware, ctx, best, found, notes, kv_dtype == "fp8"),
    )
