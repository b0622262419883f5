"""Predicted time of CPU-only plans: facli's forward pass on the CPU, in float32.

One call of the model (a prefill chunk of T tokens after S cached positions, for `rows`
sequences; a decode step is T = 1) costs the sum of TERMS, each a count times a fitted cost:

    L * layer overhead                       Python, op dispatch and thread hand-offs per layer
    + weight bytes / weight rate             every projection and MLP matrix, and the LM head
    + layer weight bytes / packing rate      T > 1 only: the GEMMs pack each weight matrix again
    + 2 * weights * T / GEMM FLOP rate       the matmul FLOPs (LM head: one position)
    + activation bytes / activation rate     norms, RoPE, SiLU, residuals: T tokens, every layer
    + cache bytes / cache rate               K and V of positions 0..S+T, every layer
    + L * heads * (S + T) * key cost         a pass over every key, per head (the decode kernel's)
    + L * heads * T * S * prefix score cost  scores over the cached prefix
    + L * heads * T * T * chunk score cost   scores within the chunk (causal)

On n threads each term's one-thread time shrinks as Amdahl's law has it, s + (1 - s) / n, with
a serial share s for the compute terms and one for the memory terms, while the per-layer
overhead grows as n ** exponent (thread hand-offs; CpuScaling). The constants are per
instruction set (what PyTorch's kernels dispatch to: torch.backends.cpu.get_cpu_capability()),
fitted by `python benchmarks/cpu_calibration.py` to timings of facli's own forward pass; they
are unknown for any other instruction set, and for what those runs never measured (other
dtypes, several CPU ranks). docs/calibration.md has the fit and its errors.
"""

from dataclasses import dataclass, fields

import numpy as np

from facli.models.config import ModelConfig

CPU_DTYPE_BYTES = 4  # the CPU computes in float32: the only dtype measured


@dataclass(frozen=True)
class CpuScaling:
    """How each term's time changes with the thread count n."""

    compute: float  # serial share of the GEMM FLOPs and the attention's per-key and score costs
    memory: float  # serial share of the weight, activation and cache bytes
    overhead: float  # the per-layer overhead grows as n ** overhead (thread hand-offs)


@dataclass(frozen=True)
class CpuConstants:
    """One instruction set's fitted costs at one thread, in the order of TERMS (unit in the
    name: a rate in GB/s or GFLOP/s, or a time per unit in us or ns); then CpuScaling's."""

    layer_overhead_us: float  # per layer per call
    weight_gbps: float  # weight bytes streamed per second
    gemm_pack_gbps: float  # layer weight bytes a GEMM of more than one row packs per second
    gemm_gflops: float  # matmul FLOP/s
    activation_gbps: float  # bytes the elementwise ops pass per second
    cache_gbps: float  # KV cache bytes read per second
    key_ns: float  # per (head, key) pass
    prefix_score_ns: float  # per (head, query, cached key) score
    chunk_score_ns: float  # per (head, query, key of the same chunk) score
    compute_serial_share: float
    memory_serial_share: float
    overhead_exponent: float

    @property
    def scaling(self) -> CpuScaling:
        return CpuScaling(self.compute_serial_share, self.memory_serial_share,
                          self.overhead_exponent)

    def coefficients(self) -> np.ndarray:
        """Seconds per unit of each term at one thread."""
        return np.array([_seconds_per_unit(f.name, getattr(self, f.name))
                         for f in fields(self)[:TERMS]])

    @classmethod
    def from_coefficients(cls, values, scaling: CpuScaling) -> "CpuConstants":
        """The inverse of coefficients(), rounded to 4 significant digits; a term the fit found
        free (coefficient 0) gets an infinite rate or a zero cost."""
        costs = [_from_seconds(f.name, v) for f, v in zip(fields(cls)[:TERMS], values)]
        return cls(*costs, scaling.compute, scaling.memory, scaling.overhead)


TERMS = 9  # the first fields of CpuConstants are the terms' costs


def _seconds_per_unit(name: str, value: float) -> float:
    if name.endswith(("_gbps", "_gflops")):
        return 1 / (value * 1e9)
    return value * (1e-6 if name.endswith("_us") else 1e-9)


def _from_seconds(name: str, seconds: float) -> float:
    if name.endswith(("_gbps", "_gflops")):
        return float(f"{1 / (seconds * 1e9):.4g}") if seconds > 0 else float("inf")
    return float(f"{seconds / (1e-6 if name.endswith('_us') else 1e-9):.4g}")


# Fitted by benchmarks/cpu_calibration.py: the thread scaling to tests/data/
# cpu-calibration-threads-*.json, the one-thread costs to cpu-calibration-costs-*.json
# (docs/calibration.md: how, and the tables of predicted against measured).
CPU_CONSTANTS: dict[str, CpuConstants] = {
    "AVX2": CpuConstants(
        layer_overhead_us=454.8, weight_gbps=17.85, gemm_pack_gbps=11.88, gemm_gflops=88.16,
        activation_gbps=5.51, cache_gbps=13.62, key_ns=11.29, prefix_score_ns=4.066,
        chunk_score_ns=2.435, compute_serial_share=0.0, memory_serial_share=0.5,
        overhead_exponent=0.125),
    "AVX512": CpuConstants(
        layer_overhead_us=262.3, weight_gbps=11.52, gemm_pack_gbps=10.22, gemm_gflops=166.6,
        activation_gbps=4.655, cache_gbps=6.082, key_ns=0.0, prefix_score_ns=2.951,
        chunk_score_ns=1.54, compute_serial_share=0.1, memory_serial_share=0.06,
        overhead_exponent=0.25),
}


def cpu_step_terms(config: ModelConfig, tokens, start, threads, scaling: CpuScaling,
                   rows: int = 1) -> np.ndarray:
    """The counts of TERMS for one forward call (module docstring), each divided by its rate's
    growth on `threads` threads, so that the dot product with CpuConstants.coefficients() is
    seconds: shape [TERMS], or [TERMS, N] for arrays of N (tokens, start). `rows` sequences of
    `tokens` each, at the same `start`, share one read of the weights."""
    tokens, start = np.broadcast_arrays(np.asarray(tokens, dtype=np.float64),
                                        np.asarray(start, dtype=np.float64))
    layers, heads, width = config.num_hidden_layers, config.num_attention_heads, config.hidden_size
    q, kv = heads * config.head_dim, config.num_key_value_heads * config.head_dim
    per_layer = width * (q + 2 * kv) + q * width + 3 * width * config.intermediate_size
    head = config.vocab_size * width
    calls = np.ones_like(tokens)
    keys = start + tokens
    terms = np.stack([
        layers * calls,
        (layers * per_layer + head) * CPU_DTYPE_BYTES * calls,
        layers * per_layer * CPU_DTYPE_BYTES * (rows * tokens > 1),
        2 * rows * (layers * per_layer * tokens + head),
        # Elements the elementwise ops pass per token: norms and residuals (width), RoPE (q, k),
        # SiLU and its product (intermediate), each read and written.
        rows * layers * tokens * (8 * width + 3 * (q + kv) + 4 * config.intermediate_size)
        * CPU_DTYPE_BYTES,
        2 * rows * layers * kv * keys * CPU_DTYPE_BYTES,
        rows * layers * heads * keys,
        rows * layers * heads * tokens * start,
        rows * layers * heads * tokens * tokens,
    ])
    return terms * thread_factors(threads, scaling).reshape((TERMS,) + (1,) * tokens.ndim)


def thread_factors(threads, scaling: CpuScaling) -> np.ndarray:
    """What each term's count is multiplied by on `threads` threads (an int, or an array: then
    shape [TERMS, len])."""
    n = np.asarray(threads, dtype=np.float64)
    compute = scaling.compute + (1 - scaling.compute) / n
    memory = scaling.memory + (1 - scaling.memory) / n
    return np.stack([n ** scaling.overhead, memory, memory, compute, memory, memory, compute,
                     compute, compute])


def cpu_step_seconds(constants: CpuConstants, config: ModelConfig, tokens: int, start: int,
                     threads: int, rows: int = 1) -> float:
    """Seconds of one forward call of `rows` x `tokens` tokens after `start` cached positions."""
    terms = cpu_step_terms(config, tokens, start, threads, constants.scaling, rows)
    return float(terms @ constants.coefficients())


# The instruction set whose rates stand in, for ranking chunks only, where the CPU's are unknown.
NOMINAL_ISA = "AVX512"


def unknown_cpu_time(cpu, tp: int, weight_dtype_bytes: int, kv_dtype_bytes: int) -> str | None:
    """Why a CPU-only plan's time cannot be predicted on `cpu` (a CpuSpec or None), or None when
    it can: the constants are measured per instruction set, in float32, on one process."""
    if cpu is None:
        return "the CPU's threads and instruction set are not known (a hardware recipe's host)"
    if cpu.isa not in CPU_CONSTANTS:
        measured = ", ".join(sorted(CPU_CONSTANTS)) or "none"
        return (f"no CPU rates for instruction set {cpu.isa} (measured: {measured}; "
                f"benchmarks/cpu_calibration.py measures them)")
    if weight_dtype_bytes != CPU_DTYPE_BYTES or kv_dtype_bytes != CPU_DTYPE_BYTES:
        return "CPU rates are measured in float32 only"
    if tp > 1:
        return "the all_reduce between CPU ranks (gloo) is not measured"
    return None


def _constants(cpu, table: dict[str, CpuConstants] | None) -> tuple[CpuConstants, int]:
    """The CPU's constants (from `table`, default CPU_CONSTANTS) and threads; where they are
    unknown, NOMINAL_ISA's (ranking only)."""
    table = CPU_CONSTANTS if table is None else table
    threads = cpu.threads if cpu is not None else 1
    if cpu is not None and cpu.isa in table:
        return table[cpu.isa], threads
    return table[NOMINAL_ISA], threads


def cpu_prefill_breakdown(cpu, config: ModelConfig, ctx: int, batch: int, chunk: int, tp: int,
                          table: dict[str, CpuConstants] | None = None) -> dict[str, float]:
    """time_model.prefill_breakdown's terms for a CPU-only plan: chunks of `chunk` tokens, the
    batch's sequences one after another, each rank with its share of the threads and weights.
    `table`: constants other than CPU_CONSTANTS (the calibration script's refit)."""
    constants, threads = _constants(cpu, table)
    threads = max(1, threads // tp)
    starts = np.arange(0, ctx, chunk)
    terms = cpu_step_terms(config, np.minimum(chunk, ctx - starts), starts, threads,
                           constants.scaling).sum(axis=1)
    seconds = terms * constants.coefficients() / _per_rank(tp)
    total = float(seconds.sum()) * batch
    return {"prefill_s": total, "prefill_matmul_s": float(seconds[1:4].sum()) * batch,
            "prefill_attention_s": float(seconds[5:].sum()) * batch,
            "prefill_elementwise_and_overhead_s": float(seconds[0] + seconds[4]) * batch,
            "prefill_comm_exposed_s": 0.0, "prefill_host_transfer_exposed_s": 0.0}


def cpu_decode_breakdown(cpu, config: ModelConfig, ctx: int, batch: int, tp: int,
                         table: dict[str, CpuConstants] | None = None) -> dict[str, float]:
    """time_model.decode_breakdown's terms for a CPU-only plan: one step of the batch's rows at
    depth `ctx`."""
    constants, threads = _constants(cpu, table)
    threads = max(1, threads // tp)
    terms = cpu_step_terms(config, 1, ctx, threads, constants.scaling, rows=batch)
    seconds = terms * constants.coefficients() / _per_rank(tp)
    step = float(seconds.sum())
    return {"decode_step_s": step, "decode_device_s": step, "decode_host_kv_s": 0.0,
            "decode_comm_s": 0.0, "decode_host_cpu_share": 0.0}


def _per_rank(tp: int) -> np.ndarray:
    """Each term's share on one of `tp` ranks: all but the per-layer overhead split."""
    return np.array([1] + [tp] * (TERMS - 1), dtype=np.float64)
