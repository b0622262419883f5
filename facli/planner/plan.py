"""The Plan: the contract between the planner and the runtime.

Frozen data with a stable JSON form (`schema_version`). The runtime executes a plan as given
(TP degree, which layers' KV live on the GPU and which in pinned host memory, prefill chunk,
decode mode, AllReduce tile) and reports its measurements next to the predictions here.
"""

import json
from dataclasses import asdict, dataclass, fields

from facli.units import format_bytes, format_ctx, format_seconds

SCHEMA_VERSION = 1
DECODE_MODES = ("resident", "prefetch", "cpu", "split")


@dataclass(frozen=True)
class DevicePlan:
    """One rank's device and its predicted peak bytes (what max_memory_allocated measures)."""

    index: int
    kind: str  # "cuda" or "cpu"
    name: str
    capacity_bytes: int  # memory the spec gives (a detected GPU: free memory at detection)
    reserved_bytes: int  # outside PyTorch's allocator (CUDA context); not in peak_bytes
    margin_bytes: int  # the safety margin kept free
    budget_bytes: int  # capacity - reserved - margin: what the peak must stay under
    weights_bytes: int
    kv_bytes: int  # KV of the layers resident on this device
    kv_staging_bytes: int  # GPU buffers for host-resident layers (write-back, prefetch)
    activation_bytes: int  # peak transient of one prefill chunk
    comm_bytes: int  # tiling-AllReduce buffers
    workspace_bytes: int
    peak_bytes: int

    @property
    def free_bytes(self) -> int:
        return self.budget_bytes - self.peak_bytes


@dataclass(frozen=True)
class HostPlan:
    """Pinned host memory for KV of host-resident layers, summed over ranks."""

    ram_bytes: int
    budget_bytes: int
    kv_bytes: int
    layers: tuple[int, ...]
    # The longest prompt (positions) whose host layers' rows all stay in the GPU's staging slots,
    # read there without crossing PCIe (offload.kv_store's packed slots); 0 without host layers.
    packed_prompt_tokens: int = 0


@dataclass(frozen=True)
class Timing:
    """Predicted seconds. Decode figures are for a step with the whole context cached. Where a
    term of the time model is unknown for this placement, every figure is None and `unknown`
    says why."""

    prefill_s: float | None
    ttft_s: float | None
    decode_step_s: float | None
    decode_tokens_per_s: float | None  # all sequences of the batch together
    new_tokens: int  # decode steps counted in total_s (the planner's ranking)
    total_s: float | None
    terms: tuple[tuple[str, float], ...]
    unknown: str = ""

    def phrase(self, prefill_phrase: str) -> str:
        """'<prefill_phrase> ~2.0 s, decode ~113.0 tok/s', or why the time is unknown."""
        if self.unknown:
            return f"time unknown: {self.unknown}"
        return (f"{prefill_phrase} ~{format_seconds(self.ttft_s)}, decode "
                f"~{self.decode_tokens_per_s:.1f} tok/s")


@dataclass(frozen=True)
class Plan:
    """Where everything goes and how long it should take."""

    model: str
    hardware: str
    ctx: int
    batch: int
    weight_dtype: str  # "bf16", "fp16" or "fp32"
    kv_dtype: str  # "bf16", "fp16", "fp32" or "fp8"
    tp: int
    device_kind: str  # "cuda" or "cpu"
    devices: tuple[DevicePlan, ...]  # one per rank
    gpu_layers: tuple[int, ...]  # layers whose KV lives on the device(s), every rank
    host: HostPlan
    prefill_chunk: int
    allreduce_tile_tokens: int  # tokens per tiling-AllReduce tile (= chunk with one rank)
    decode_mode: str  # "resident" (no host layers), "prefetch", "cpu" or "split"
    timing: Timing
    fits: bool
    explanation: tuple[str, ...]
    host_cpu_share: float = 0.0  # "split" decode: share of each host layer's rows the CPU attends
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self):
        assert self.decode_mode in DECODE_MODES, self.decode_mode
        assert len(self.devices) == self.tp, (len(self.devices), self.tp)
        assert not set(self.gpu_layers) & set(self.host.layers)

    @property
    def host_layers(self) -> tuple[int, ...]:
        return self.host.layers

    @property
    def hints(self) -> tuple[str, ...]:
        """Explanation lines suggesting an option that would be faster ("hint: ...")."""
        return tuple(line for line in self.explanation if line.startswith("hint: "))

    @property
    def peak_bytes(self) -> int:
        return max(d.peak_bytes for d in self.devices)

    def to_dict(self) -> dict:
        raw = asdict(self)
        raw["timing"]["terms"] = dict(self.timing.terms)
        for device, plan_device in zip(raw["devices"], self.devices):
            device["free_bytes"] = plan_device.free_bytes
        raw["host_layers"] = list(self.host.layers)
        raw["peak_bytes"] = self.peak_bytes
        return _lists(raw)

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=True)

    @classmethod
    def from_dict(cls, raw: dict) -> "Plan":
        """Inverse of to_dict (for handing a plan to other ranks or processes)."""
        if raw.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(f"plan schema {raw.get('schema_version')}, expected {SCHEMA_VERSION}")
        known = {f.name for f in fields(DevicePlan)}
        devices = tuple(DevicePlan(**{k: v for k, v in d.items() if k in known})
                        for d in raw["devices"])
        host = HostPlan(**{**raw["host"], "layers": tuple(raw["host"]["layers"])})
        timing = Timing(**{**raw["timing"], "terms": tuple(raw["timing"]["terms"].items())})
        values = {f.name: raw[f.name] for f in fields(cls) if f.name in raw}
        values.update(devices=devices, host=host, timing=timing,
                      gpu_layers=tuple(raw["gpu_layers"]),
                      explanation=tuple(raw["explanation"]))
        return cls(**values)

    def summary_line(self) -> str:
        peak, budget = self.peak_bytes, min(d.budget_bytes for d in self.devices)
        where = "GPU" if self.device_kind == "cuda" else "CPU"
        layers = len(self.gpu_layers) + len(self.host.layers)
        kv = f"KV {len(self.gpu_layers)}/{layers} layers on {where}"
        if self.host.layers:
            kv += f", {len(self.host.layers)} on host ({self.decode_mode} decode)"
        verdict = "fits" if self.fits else "DOES NOT FIT"
        return (
            f"plan: {self.model} ctx {format_ctx(self.ctx)} batch {self.batch} on {self.hardware}: "
            f"TP {self.tp}, chunk {self.prefill_chunk}, {kv}, peak {format_bytes(peak)} of "
            f"{format_bytes(budget)} per {where} ({verdict}); {self.timing.phrase(self.prefill_phrase)}"
        )

    @property
    def prefill_phrase(self) -> str:
        """What timing.ttft_s measures: one prompt's first token, or a batch's prefills (the
        runtime prefills its prompts one after another)."""
        if self.batch == 1:
            return "time to first token"
        return f"prefill of {self.batch} full-context prompts, one after another,"


def _lists(value):
    if isinstance(value, dict):
        return {k: _lists(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_lists(v) for v in value]
    return value

