"""One candidate placement: its memory on every rank, whether it fits, and its predicted time."""

from dataclasses import dataclass, field

from facli.errors import FacliError
from facli.models.config import ModelConfig
from facli.parallel.degrees import sharded_sizes
from facli.planner.hardware import HardwareSpec
from facli.planner.memory import (
    DTYPE_BYTES,
    MemoryBreakdown,
    canonical_dtype,
    device_memory,
    kv_layer_bytes,
    reserved_outside_allocator,
)
from facli.planner.policy import (
    gpus_prefill_fp8,
    prefill_tile,
    splits_into_tiles,
    sums_with_copy_engines,
)
from facli.planner.time_model import (
    Layout,
    choose_allreduce_tile,
    decode_breakdown,
    prefill_breakdown,
    unknown_time,
)

FP8_NATIVE_CAPABILITY = (8, 9)


@dataclass(frozen=True)
class Candidate:
    tp: int
    chunk: int
    tile_tokens: int
    decode_mode: str  # "resident", "prefetch", "cpu" or "split"
    gpu_layers: int  # how many layers' KV stay on the device(s)
    host_layers: int
    memory: MemoryBreakdown  # one rank
    budget_bytes: int  # one rank
    host_kv_bytes: int  # all ranks
    host_budget_bytes: int
    on_cpu: bool = False
    times: dict = field(default_factory=dict)
    new_tokens: int = 0
    unknown: str = ""  # why the times are unknown (they then only rank candidates)

    @property
    def short_on(self) -> str | None:
        if self.memory.total > self.budget_bytes:
            return "device"
        if self.host_kv_bytes > self.host_budget_bytes:
            return "host"
        return None

    @property
    def fits(self) -> bool:
        return self.short_on is None

    @property
    def need_bytes(self) -> int:
        return self.host_kv_bytes if self.short_on == "host" else self.memory.total

    @property
    def has_bytes(self) -> int:
        return self.host_budget_bytes if self.short_on == "host" else self.budget_bytes

    @property
    def shortfall_bytes(self) -> int:
        return max(0, self.need_bytes - self.has_bytes)

    @property
    def total_s(self) -> float:
        return self.times["prefill_s"] + self.new_tokens * self.times["decode_step_s"]

    def describe(self) -> str:
        where = "CPU" if self.on_cpu else "GPU"
        text = f"TP {self.tp}, chunk {self.chunk}, KV of {self.gpu_layers} layers on {where}"
        if self.host_layers:
            text += f" and {self.host_layers} on host ({self.decode_mode} decode)"
        return text


def tp_choices(model: ModelConfig, hardware: HardwareSpec, fixed: int | None) -> list[int]:
    """TP degrees that divide the heads, KV heads, MLP width and vocabulary, on at most the GPUs
    there are."""
    sizes = sharded_sizes(model)
    valid = [t for t in range(1, hardware.num_gpus + 1)
             if all(size % t == 0 for size in sizes.values())]
    if fixed is None:
        return valid
    if fixed > hardware.num_gpus:
        raise FacliError(
            f"expected --devices at most the {hardware.num_gpus} GPU(s) of {hardware.name}, "
            f"got {fixed}"
        )
    if fixed not in valid:
        named = ", ".join(f"{name} {size}" for name, size in sizes.items())
        raise FacliError(
            f"expected --devices dividing the model's {named} (one of "
            f"{', '.join(map(str, valid))}), got {fixed}"
        )
    return [fixed]


def resolve_dtypes(model: ModelConfig, hardware: HardwareSpec,
                   options) -> tuple[str, str, tuple[str, ...]]:
    """(weight dtype, KV dtype, notes) after `auto` and what the GPUs can compute in."""
    notes = []
    gpus = hardware.devices
    if options.weight_dtype == "auto" and not gpus:
        weight = "fp32"  # as the runtime: CPUs compute in float32
    elif options.weight_dtype == "auto":
        weight = canonical_dtype(model.torch_dtype)
        if weight == "fp32":
            weight = "bf16"
            notes.append("weights: the checkpoint is fp32; GPUs run it in bf16")
    else:
        weight = canonical_dtype(options.weight_dtype)
    if weight == "fp8":
        raise FacliError("expected a weight dtype of bf16, fp16 or fp32, got fp8")
    if weight == "bf16" and gpus and not all(g.supports_bf16 for g in gpus):
        if options.weight_dtype != "auto":
            raise FacliError(
                f"expected fp16 or fp32 weights on {gpus[0].name} (compute capability "
                f"{gpus[0].compute_capability[0]}.{gpus[0].compute_capability[1]} has no bf16), "
                "got bf16"
            )
        weight = "fp16"
        notes.append(f"weights: bf16 -> fp16, since {gpus[0].name} has no bf16 arithmetic")
    kv = weight if options.kv_dtype == "auto" else canonical_dtype(options.kv_dtype)
    if kv == "bf16" and gpus and not all(g.supports_bf16 for g in gpus):
        raise FacliError(f"expected --kv-dtype fp16, fp32 or fp8 on {gpus[0].name}, got bf16")
    if kv == "fp8" and gpus and min(g.compute_capability for g in gpus) < FP8_NATIVE_CAPABILITY:
        notes.append("KV: fp8 is storage only on this GPU; attention upconverts each tile")
    return weight, kv, tuple(notes)


def _max_gpu_layers(layers: int, budget: int, total) -> int:
    """Most GPU layers n with total(n) <= budget; -1 when even 0 does not fit. total(n) is
    fixed + n * layer KV + staging, and staging is the same for any n <= layers - 2."""
    if total(layers) <= budget:
        return layers
    if layers >= 1 and total(layers - 1) <= budget:
        return layers - 1
    if layers < 2:
        return 0 if total(0) <= budget else -1
    per_layer = total(1) - total(0)
    base = total(0)
    if base > budget:
        return -1
    most = (budget - base) // per_layer if per_layer > 0 else layers - 2
    return int(min(most, layers - 2))


def placement(model: ModelConfig, hardware: HardwareSpec, ctx: int, batch: int, tp: int,
              chunk: int, weight_dtype: str, kv_dtype: str,
              tile: int | None = None) -> tuple[int, MemoryBreakdown, int]:
    """(GPU layers, one rank's memory, per-rank budget) with as much KV on the GPU as fits;
    `tile`: the prefill AllReduce tile (default: policy.prefill_tile's)."""
    tile = (prefill_tile(tp, chunk, on_gpu=True) or chunk) if tile is None else tile
    copy_inboxes = sums_with_copy_engines(tp, on_gpu=True) and splits_into_tiles(chunk, tile)
    layers = model.num_hidden_layers
    wb, kb = DTYPE_BYTES[weight_dtype], DTYPE_BYTES[kv_dtype]
    budget = (min(hardware.gpu_budget_bytes(i) for i in range(tp))
              - reserved_outside_allocator(tp))

    def memory(gpu_layers: int) -> MemoryBreakdown:
        return device_memory(model, ctx=ctx, batch=batch, tp=tp, gpu_layers=gpu_layers,
                             host_layers=layers - gpu_layers, chunk=chunk,
                             weight_dtype_bytes=wb, kv_dtype_bytes=kb, copy_inboxes=copy_inboxes,
                             fp8_tiles=not gpus_prefill_fp8(hardware.devices[:tp]))

    gpu_layers = _max_gpu_layers(layers, budget, lambda n: memory(n).total)
    return gpu_layers, memory(max(gpu_layers, 0)), budget


def evaluate(model: ModelConfig, hardware: HardwareSpec, ctx: int, batch: int, tp: int,
             chunk: int, mode: str, weight_dtype: str, kv_dtype: str, options) -> Candidate:
    """The placement for one (TP degree, chunk, decode mode) and its predicted time."""
    wb, kb = DTYPE_BYTES[weight_dtype], DTYPE_BYTES[kv_dtype]
    layout = Layout(model, ctx, batch, tp, chunk, chunk, 0, "resident", wb, kb)
    tile = options.allreduce_tile_tokens or choose_allreduce_tile(hardware, layout)
    tile = min(tile, chunk)
    gpu_layers, memory, budget = placement(model, hardware, ctx, batch, tp, chunk,
                                           weight_dtype, kv_dtype, tile)
    layers = model.num_hidden_layers
    host_layers = layers - max(gpu_layers, 0)
    mode = mode if host_layers else "resident"
    layout = Layout(model, ctx, batch, tp, chunk, tile, host_layers, mode, wb, kb)
    times = {**prefill_breakdown(hardware, layout), **decode_breakdown(hardware, layout)}
    host_kv = host_layers * kv_layer_bytes(model, ctx, batch, kb, tp) * tp
    return Candidate(tp, chunk, tile, mode, max(gpu_layers, 0), host_layers, memory, budget,
                     host_kv, hardware.host_budget_bytes, times=times,
                     new_tokens=options.new_tokens)


def evaluate_cpu(model: ModelConfig, hardware: HardwareSpec, ctx: int, batch: int, tp: int,
                 chunk: int, weight_dtype: str, kv_dtype: str, options) -> Candidate:
    """A CPU-only placement: `tp` ranks sharing host memory, everything resident there."""
    wb, kb = DTYPE_BYTES[weight_dtype], DTYPE_BYTES[kv_dtype]
    layers = model.num_hidden_layers
    memory = device_memory(model, ctx=ctx, batch=batch, tp=tp, gpu_layers=layers,
                           host_layers=0, chunk=chunk, weight_dtype_bytes=wb, kv_dtype_bytes=kb)
    budget = (hardware.host_budget_bytes - hardware.safety_margin_bytes) // tp
    tile = min(options.allreduce_tile_tokens or chunk, chunk)
    layout = Layout(model, ctx, batch, tp, chunk, tile, 0, "resident", wb, kb, on_cpu=True)
    times = {**prefill_breakdown(hardware, layout), **decode_breakdown(hardware, layout)}
    return Candidate(tp, chunk, tile, "resident", layers, 0, memory, budget, 0,
                     hardware.host_budget_bytes, on_cpu=True, times=times,
                     new_tokens=options.new_tokens, unknown=unknown_time(hardware, layout) or "")


def fits_memory(model: ModelConfig, hardware: HardwareSpec, ctx: int, batch: int, tp: int,
                chunk: int, weight_dtype: str, kv_dtype: str) -> bool:
    """Whether some KV split fits at this TP degree and chunk (memory only, no timing)."""
    kb = DTYPE_BYTES[kv_dtype]
    if hardware.num_gpus == 0:
        memory = device_memory(model, ctx=ctx, batch=batch, tp=tp,
                               gpu_layers=model.num_hidden_layers, host_layers=0, chunk=chunk,
                               weight_dtype_bytes=DTYPE_BYTES[weight_dtype], kv_dtype_bytes=kb)
        return memory.total * tp <= hardware.host_budget_bytes - hardware.safety_margin_bytes
    gpu_layers, memory, budget = placement(model, hardware, ctx, batch, tp, chunk,
                                           weight_dtype, kv_dtype)
    if gpu_layers < 0 or memory.total > budget:
        return False
    host_layers = model.num_hidden_layers - gpu_layers
    host_kv = host_layers * kv_layer_bytes(model, ctx, batch, kb, tp) * tp
    return host_kv <= hardware.host_budget_bytes
