"""Hardware specs for the planner: detected on this machine or named from a recipe.

A HardwareSpec is plain data (sizes and rates). Detection is the only part that touches
devices; the planner only reads the spec.
"""

import re
from dataclasses import dataclass, replace

from facli.errors import FacliError
from facli.models.recipe_loader import list_hardware_recipes, read_recipe
from facli.units import GIB, format_bytes

MIB = 1024**2
# Default safety margin per GPU when the user gives none: allocator fragmentation and what the
# model of activations misses.
DEFAULT_MARGIN_FRACTION = 0.03
# Share of host RAM the planner may pin for KV; the rest stays for the OS, the process and the
# page cache that memory-mapped checkpoint loading relies on.
HOST_PINNABLE_FRACTION = 0.8
# Rough rates for a detected machine when no recipe names its GPU or host (estimates).
_FALLBACK_CPU_MEMORY_GBPS_PER_CORE = 6.0
# CPU attention's bf16 scan as a share of CPU memory bandwidth (benchmarks/cpu_attention.py).
_FALLBACK_CPU_ATTENTION_SHARE = 0.55
_FALLBACK_CPU_TFLOPS_PER_CORE = 0.05
_FALLBACK_HOST_DEVICE_GBPS = 12.0  # PCIe 3.0 x16, pinned
_FALLBACK_INTER_GPU_GBPS = 20.0  # peer traffic over PCIe
_FALLBACK_ALLREDUCE_LATENCY_US = 30.0


@dataclass(frozen=True)
class GpuSpec:
    """One GPU. memory_bytes is what facli may use before reserved_bytes and the margin."""

    name: str
    memory_bytes: int  # a recipe: total memory; detected: free memory (context already made)
    reserved_bytes: int  # memory outside PyTorch's allocator (CUDA context, NCCL); 0 if detected
    matmul_tflops: float  # achievable dense matmul TFLOP/s in bf16 (fp16 on Volta)
    hbm_gbps: float  # achievable device memory GB/s
    compute_capability: tuple[int, int]
    sms: int = 0  # streaming multiprocessors; 0: unknown (decode's wave fill is not modelled)

    def __post_init__(self):
        if self.memory_bytes <= 0 or self.matmul_tflops <= 0 or self.hbm_gbps <= 0:
            raise FacliError(
                f"expected positive memory, matmul TFLOP/s and HBM GB/s for GPU {self.name}, got "
                f"{self.memory_bytes}, {self.matmul_tflops}, {self.hbm_gbps}"
            )

    @property
    def supports_bf16(self) -> bool:
        return tuple(self.compute_capability) >= (8, 0)


@dataclass(frozen=True)
class CpuSpec:
    """The CPU that computes a CPU-only plan, as far as its time model needs it."""

    threads: int  # intra-op threads a run uses (torch.get_num_threads())
    isa: str  # vector instructions PyTorch's CPU kernels use (torch.backends.cpu.get_cpu_capability())


def detect_cpu() -> CpuSpec:
    """This process's CPU: the threads a run here uses and the instruction set it computes with."""
    import torch

    return CpuSpec(threads=torch.get_num_threads(), isa=torch.backends.cpu.get_cpu_capability())


@dataclass(frozen=True)
class HardwareSpec:
    """GPUs, host memory and the rates of every link the planner's time model uses."""

    name: str
    devices: tuple[GpuSpec, ...]
    host_ram_bytes: int  # a recipe: installed RAM; detected: available RAM
    host_device_gbps: float  # pinned host <-> one GPU, each way
    cpu_memory_gbps: float  # host DRAM bandwidth
    cpu_attention_gbps: float  # KV bytes per second that attention on the CPU scans
    cpu_matmul_tflops: float  # host matmul rate (not used: planner.cpu_time times CPU-only plans)
    inter_gpu_gbps: float  # AllReduce bus bandwidth per GPU (0 with one GPU)
    allreduce_latency_us: float  # fixed cost of one small AllReduce
    safety_margin_bytes: int  # kept free on every GPU when deciding what fits
    detected: bool = False
    cpu: CpuSpec | None = None  # None: not known (a recipe's host), so no CPU-only plan is timed

    def __post_init__(self):
        object.__setattr__(self, "devices", tuple(self.devices))
        if self.host_ram_bytes <= 0:
            raise FacliError(f"expected positive host RAM, got {self.host_ram_bytes}")
        if self.safety_margin_bytes < 0:
            raise FacliError(f"expected a non-negative safety margin, got {self.safety_margin_bytes}")
        if len(self.devices) > 1 and self.inter_gpu_gbps <= 0:
            raise FacliError(
                f"expected inter_gpu_gbps > 0 for {len(self.devices)} GPUs, got {self.inter_gpu_gbps}"
            )

    @property
    def num_gpus(self) -> int:
        return len(self.devices)

    def gpu_budget_bytes(self, index: int) -> int:
        """What the plan may fill on GPU `index`: memory less reserved and the margin."""
        gpu = self.devices[index]
        return gpu.memory_bytes - gpu.reserved_bytes - self.safety_margin_bytes

    @property
    def host_budget_bytes(self) -> int:
        return int(self.host_ram_bytes * HOST_PINNABLE_FRACTION)

    def with_margin(self, margin) -> "HardwareSpec":
        """The same hardware with another safety margin (see resolve_margin)."""
        memory = min((g.memory_bytes for g in self.devices), default=self.host_ram_bytes)
        return replace(self, safety_margin_bytes=resolve_margin(margin, memory))


_MARGIN_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(%|[kmg]i?b?)?\s*$", re.IGNORECASE)
_MARGIN_UNITS = {"k": 1024, "m": MIB, "g": GIB}


def resolve_margin(margin, memory_bytes: int) -> int:
    """Margin in bytes: None -> 3% of memory_bytes; int -> bytes; "5%", "2GiB", "512m", "1.5"
    (a bare number is GiB). It must leave part of memory_bytes (the smallest GPU's memory, or
    the host's without GPUs) to plan in."""
    if margin is None:
        return int(memory_bytes * DEFAULT_MARGIN_FRACTION)
    if isinstance(margin, int) and not isinstance(margin, bool):
        if margin < 0:
            raise FacliError(f"expected a non-negative --margin, got {margin}")
        size = margin
    else:
        match = _MARGIN_PATTERN.match(str(margin))
        if match is None:
            raise FacliError(f"expected --margin such as 2GiB, 512MiB or 5%, got {margin!r}")
        value, unit = float(match.group(1)), (match.group(2) or "g").lower()
        if unit == "%":
            if value >= 100:
                raise FacliError(f"expected --margin below 100%, got {margin!r}")
            return int(memory_bytes * value / 100)
        size = value * _MARGIN_UNITS[unit[0]]  # inf for a number of hundreds of digits
    if not size < memory_bytes:
        given = str(margin) if len(str(margin)) <= 24 else f"{str(margin)[:21]}..."
        raise FacliError(f"expected --margin below the {format_bytes(memory_bytes)} of memory it "
                         f"is kept from, got {given}; give a smaller size or a share such as 5%")
    return int(size)


def _gpu_from_table(table: dict, name: str | None = None) -> GpuSpec:
    return GpuSpec(
        name=name or str(table["name"]),
        memory_bytes=int(table["memory_mib"]) * MIB,
        reserved_bytes=int(table["reserved_mib"]) * MIB,
        matmul_tflops=float(table["matmul_tflops"]),
        hbm_gbps=float(table["hbm_gbps"]),
        compute_capability=tuple(int(v) for v in table["compute_capability"]),
        sms=int(table.get("sms", 0)),
    )


def load_hardware(name: str, margin=None) -> HardwareSpec:
    """The named hardware recipe (`recipes/hardware/<name>.toml`), matched regardless of case or
    by a prefix that names one recipe alone (1xH200); unknown names list the valid."""
    name = _recipe_name(name)
    raw = read_recipe("hardware", name)
    try:
        gpu = _gpu_from_table(raw["gpu"])
        host, link = raw["host"], raw["interconnect"]
        spec = HardwareSpec(
            name=name,
            devices=(gpu,) * int(raw["count"]),
            host_ram_bytes=int(float(host["ram_gib"]) * GIB),
            host_device_gbps=float(host["host_device_gbps"]),
            cpu_memory_gbps=float(host["cpu_memory_gbps"]),
            cpu_attention_gbps=float(host["cpu_attention_gbps"]),
            cpu_matmul_tflops=float(host["cpu_matmul_tflops"]),
            inter_gpu_gbps=float(link["inter_gpu_gbps"]),
            allreduce_latency_us=float(link["allreduce_latency_us"]),
            safety_margin_bytes=0,
        )
    except KeyError as missing:
        raise FacliError(f"expected key {missing} in hardware recipe {name}, found none") from None
    return spec.with_margin(margin)


def _recipe_name(given: str) -> str:
    names = list_hardware_recipes()
    folded = given.lower()
    matches = ([n for n in names if n == given] or [n for n in names if n.lower() == folded]
               or [n for n in names if n.lower().startswith(folded)])
    if len(matches) > 1:
        raise FacliError(f"expected one hardware recipe name, got {given!r}, which begins "
                         f"{', '.join(matches)}; give more of the name")
    return matches[0] if matches else given


def _recipe_matching(device_name: str, count: int) -> dict | None:
    """The hardware recipe whose GPU matches `device_name`, preferring the same GPU count."""
    matches = []
    for recipe_name in list_hardware_recipes():
        raw = read_recipe("hardware", recipe_name)
        patterns = raw.get("gpu", {}).get("match", [])
        if any(p.lower() in device_name.lower() for p in patterns):
            matches.append(raw)
    matches.sort(key=lambda raw: (int(raw["count"]) != count, -int(raw["count"])))
    return matches[0] if matches else None


def _fallback_gpu_rates(capability: tuple[int, int]) -> tuple[float, float]:
    """(matmul TFLOP/s, HBM GB/s) for an unknown GPU: conservative by architecture."""
    if capability >= (9, 0):
        return 400.0, 2000.0
    if capability >= (8, 0):
        return 120.0, 800.0
    return 50.0, 500.0


def detect_hardware(margin=None, gpus: bool = True) -> HardwareSpec:
    """This machine: GPUs with their free memory (torch.cuda.mem_get_info), available host RAM
    (psutil), rates from the hardware recipe whose GPU name matches (estimates otherwise).
    With no GPU, or gpus False (a CPU run, which must not initialize CUDA), the spec has no
    devices and plans run on the CPU."""
    import psutil
    import torch

    count = torch.cuda.device_count() if gpus and torch.cuda.is_available() else 0
    devices, recipe = [], None
    for index in range(count):
        free, _total = torch.cuda.mem_get_info(index)
        name = torch.cuda.get_device_name(index)
        capability = tuple(torch.cuda.get_device_capability(index))
        recipe = recipe or _recipe_matching(name, count)
        if recipe is not None:
            matmul, hbm = float(recipe["gpu"]["matmul_tflops"]), float(recipe["gpu"]["hbm_gbps"])
        else:
            matmul, hbm = _fallback_gpu_rates(capability)
        sms = torch.cuda.get_device_properties(index).multi_processor_count
        devices.append(GpuSpec(name, int(free), 0, matmul, hbm, capability, sms))
    cores = psutil.cpu_count(logical=False) or psutil.cpu_count() or 1
    cpu_memory = _FALLBACK_CPU_MEMORY_GBPS_PER_CORE * cores
    host = recipe["host"] if recipe else {}
    link = recipe["interconnect"] if recipe else {}
    spec = HardwareSpec(
        name="auto",
        devices=tuple(devices),
        host_ram_bytes=int(psutil.virtual_memory().available),
        host_device_gbps=float(host.get("host_device_gbps", _FALLBACK_HOST_DEVICE_GBPS)),
        cpu_memory_gbps=cpu_memory,
        cpu_attention_gbps=cpu_memory * _FALLBACK_CPU_ATTENTION_SHARE,
        cpu_matmul_tflops=_FALLBACK_CPU_TFLOPS_PER_CORE * cores,
        inter_gpu_gbps=float(link.get("inter_gpu_gbps") or _FALLBACK_INTER_GPU_GBPS),
        allreduce_latency_us=float(link.get("allreduce_latency_us") or _FALLBACK_ALLREDUCE_LATENCY_US),
        safety_margin_bytes=0,
        detected=True,
        cpu=detect_cpu(),
    )
    return spec.with_margin(margin)


def hardware_from_option(value: str | None, margin=None, gpus: bool = True) -> HardwareSpec:
    """`--hardware NAME|auto` (None means auto; gpus False detects no GPU)."""
    if value is None or value == "auto":
        return detect_hardware(margin, gpus)
    if not value.strip():  # a blank name would begin every recipe's
        raise FacliError(f"expected --hardware auto or a hardware recipe name, one of "
                         f"{', '.join(list_hardware_recipes())}; got {value!r}")
    return load_hardware(value, margin)
