"""Offloaded KV benchmark: decode steps and chunked prefill of a Llama-7B-shaped layer stack.

    python benchmarks/offload.py [--ctx 32k,128k] [--host 4,16] [--modes prefetch,cpu,split]
                                 [--cpu-shares 0.45] [--fp8] [--prefill-ctx 32k] [--out DIR]
    python benchmarks/offload.py --ctx 256k --host 20 --prefill-ctx 0   # one GPU, 256K

32 layers, 32 heads, D = 128, bf16, batch 1. Each layer is its attention through the KV store
plus one GEMM over a [4096, 49408] bf16 matrix standing in for the layer's projections and MLP
(202M parameters, read once per decode step as a real layer's weights are). Baseline: the same
stack over an all-GPU DeviceKVCache, measured in the same run. Host layers are spread evenly.
The cache is filled with `store.write` (no attention) before decode is timed; prefill is timed
separately at --prefill-ctx. "split" runs once per --cpu-shares value (the share of each host
layer's rows the CPU attends; the rest streams over PCIe). Also measured here: pinned
host-to-device bandwidth, the CPU attention's read bandwidth, and both at once, so the PCIe- and
DRAM-bound predictions sit next to the numbers.
Logs go to stderr and DIR/offload.log, results to DIR/offload.json; the table prints last.
"""

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment  # noqa: E402

from facli.offload.cpu_attention import KEY_TILE, TileWorkspace, cpu_decode_attention  # noqa: E402
from facli.offload.device_cache import DeviceKVCache  # noqa: E402
from facli.offload.kv_store import OffloadedKVStore  # noqa: E402
from facli.units import format_bytes, parse_ctx  # noqa: E402

LAYERS, HEADS, HEAD_DIM, HIDDEN, LAYER_PARAMS = 32, 32, 128, 4096, 202_375_168
DTYPE, FILL_CHUNK = torch.bfloat16, 8192
LOG_LINES = []


def log(*parts):
    line = " ".join(str(p) for p in parts)
    LOG_LINES.append(line)
    print(line, file=sys.stderr, flush=True)


def host_layer_set(count: int) -> frozenset:
    """`count` layers spread evenly over the stack (layer 0 stays on the GPU unless all go)."""
    if count >= LAYERS:
        return frozenset(range(LAYERS))
    return frozenset(LAYERS - 1 - math.floor(i * LAYERS / count) for i in range(count))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(kind: str, ctx: int, extra: int, host: int, fp8: bool, device: torch.device,
          cpu_share: float = 0.5):
    capacity = ctx + extra
    shape = (LAYERS, 1, capacity, HEADS, HEAD_DIM, DTYPE, device)
    if kind == "gpu":
        return DeviceKVCache(*shape)
    return OffloadedKVStore(*shape, host_layers=host_layer_set(host), decode_mode=kind,
                            kv_dtype="fp8" if fp8 else None, cpu_share=cpu_share)


def fill(store, length: int, device: torch.device) -> None:
    """Random K/V at positions 0..length of every layer, without attention."""
    for layer in range(LAYERS):
        for start in range(0, length, FILL_CHUNK):
            n = min(FILL_CHUNK, length - start)
            k = torch.randn(1, n, HEADS, HEAD_DIM, dtype=DTYPE, device=device)
            v = torch.randn_like(k)
            if isinstance(store, DeviceKVCache):
                store.keys[layer, :, start:start + n] = k
                store.values[layer, :, start:start + n] = v
            else:
                store.write(layer, k, v, start)
    sync(device)


def step(store, weights, x, start: int):
    """One forward step of the stack over x [1, T, HIDDEN]: per layer a GEMM, then attention."""
    tokens = x.shape[1]
    for layer in range(LAYERS):
        h = x @ weights  # stands in for QKV, O and MLP: the weight read of one layer
        q = h[..., :HEADS * HEAD_DIM].reshape(1, tokens, HEADS, HEAD_DIM)
        k = h[..., HEADS * HEAD_DIM:2 * HEADS * HEAD_DIM].reshape(1, tokens, HEADS, HEAD_DIM)
        v = h[..., 2 * HEADS * HEAD_DIM:3 * HEADS * HEAD_DIM].reshape(1, tokens, HEADS, HEAD_DIM)
        x = x + store.attend(layer, q, k, v, start).reshape(1, tokens, HIDDEN) * 1e-3
    return x


def time_decode(store, weights, ctx: int, warmup: int, tokens: int) -> tuple[float, float]:
    """Seconds per decode step with `ctx` positions cached (median over `tokens` steps) and
    host-to-device KV bytes per timed step."""
    x = torch.randn(1, 1, HIDDEN, dtype=DTYPE, device=weights.device) * 1e-2
    times = []
    for i in range(warmup + tokens):
        if i == warmup:
            moved = getattr(store, "h2d_bytes", 0)
        sync(weights.device)
        began = time.perf_counter()
        step(store, weights, x, ctx + i)
        sync(weights.device)
        if i >= warmup:
            times.append(time.perf_counter() - began)
    moved = (getattr(store, "h2d_bytes", 0) - moved) / tokens
    return sorted(times)[len(times) // 2], moved


def time_prefill(store, weights, ctx: int, chunk: int) -> float:
    """Seconds for a chunked prefill of `ctx` tokens through the stack (TTFT without sampling)."""
    x = torch.randn(1, chunk, HIDDEN, dtype=DTYPE, device=weights.device) * 1e-2
    store.reset()
    sync(weights.device)
    began = time.perf_counter()
    for start in range(0, ctx, chunk):
        step(store, weights, x[:, :min(chunk, ctx - start)], start)
    sync(weights.device)
    return time.perf_counter() - began


def bytes_of(store) -> tuple[int, int]:
    if isinstance(store, DeviceKVCache):
        return store.keys.numel() * store.keys.element_size() * 2, 0
    return store.gpu_bytes(), store.host_bytes()


def pinned_h2d_gbps(size: int = 1 << 30) -> float:
    src = torch.empty(size, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(size, dtype=torch.uint8, device="cuda")
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    began = time.perf_counter()
    for _ in range(5):
        dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    return 5 * size / (time.perf_counter() - began) / 1e9


def cpu_attention_gbps(length: int = 32768) -> float:
    """K+V bytes per second of one CPU decode attention at `length`, for a few key tiles (the
    store uses cpu_attention.KEY_TILE); returns the figure at KEY_TILE."""
    q = torch.randn(1, 1, HEADS, HEAD_DIM, dtype=DTYPE)
    k = torch.randn(1, length, HEADS, HEAD_DIM, dtype=DTYPE)
    v = torch.randn_like(k)
    rates = {}
    for tile in sorted({1024, 4096, KEY_TILE, 16384}):
        workspace = TileWorkspace()  # reused across calls, as the KV store does
        cpu_decode_attention(q, k, v, length, key_tile=tile, workspace=workspace)
        began = time.perf_counter()
        for _ in range(3):
            cpu_decode_attention(q, k, v, length, key_tile=tile, workspace=workspace)
        rates[tile] = 3 * 2 * k.numel() * k.element_size() / (time.perf_counter() - began) / 1e9
    log("CPU attention GB/s by key tile: " + ", ".join(f"{t}: {r:.1f}" for t, r in rates.items()))
    return rates[KEY_TILE]


def concurrent_host_reads(keys: int = 262144) -> dict[str, float]:
    """GB/s of pinned host-to-device copies and of CPU attention, each alone and both at once
    over separate buffers of one 256K-key layer (4 GiB of K+V each): whether the two ways out
    of host memory add up or share the DRAM bandwidth."""
    shape = (1, keys, HEADS, HEAD_DIM)
    k, v = (torch.empty(shape, dtype=DTYPE, pin_memory=True).normal_() for _ in range(2))
    q = torch.randn(1, 1, HEADS, HEAD_DIM, dtype=DTYPE)
    src = torch.empty(2 * k.numel() * k.element_size(), dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(src.numel(), dtype=torch.uint8, device="cuda")
    stream = torch.cuda.Stream()
    nbytes = src.numel()

    def copy():
        with torch.cuda.stream(stream):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src, non_blocking=True)
            end.record()
        return start, end

    def attend():
        began = time.perf_counter()
        cpu_decode_attention(q, k, v, keys)
        return time.perf_counter() - began

    copy()
    attend()
    torch.cuda.synchronize()
    start, end = copy()
    torch.cuda.synchronize()
    h2d_alone = nbytes / (start.elapsed_time(end) / 1e3) / 1e9
    cpu_alone = nbytes / attend() / 1e9
    began = time.perf_counter()
    start, end = copy()
    cpu_s = attend()
    torch.cuda.synchronize()
    both_s = time.perf_counter() - began
    result = {"h2d_alone": h2d_alone, "cpu_alone": cpu_alone,
              "h2d_together": nbytes / (start.elapsed_time(end) / 1e3) / 1e9,
              "cpu_together": nbytes / cpu_s / 1e9, "combined": 2 * nbytes / both_s / 1e9}
    log("host reads, GB/s: " + ", ".join(f"{name} {rate:.1f}" for name, rate in result.items()))
    return result


def run_case(args, kind, ctx, host, weights, baseline, cpu_share=0.0):
    """Build, fill and time one configuration; returns its result row."""
    device = weights.device
    store = build(kind, ctx, args.warmup + args.tokens, host, args.fp8 and kind != "gpu", device,
                  cpu_share)
    began = time.perf_counter()
    fill(store, ctx, device)
    log(f"  filled {format_bytes(sum(bytes_of(store)))} in {time.perf_counter() - began:.1f} s")
    step_s, moved = time_decode(store, weights, ctx, args.warmup, args.tokens)
    gpu_b, host_b = bytes_of(store)
    mode = f"split@{cpu_share:g}" if kind == "split" else kind
    row = {"ctx": ctx, "mode": mode, "cpu_share": cpu_share, "host_layers": host if kind != "gpu" else 0,
           "kv_dtype": "fp8" if args.fp8 and kind != "gpu" else "bf16",
           "decode_ms": step_s * 1e3, "tok_s": 1 / step_s, "gpu_bytes": gpu_b,
           "host_bytes": host_b, "h2d_bytes_per_token": moved,
           "vs_gpu": (baseline or step_s) / step_s if kind == "gpu" or baseline else None}
    if ctx == args.prefill_ctx:
        row["prefill_s"] = time_prefill(store, weights, ctx, args.chunk)
    del store
    if device.type == "cuda":
        torch.cuda.empty_cache()
    log(f"  {json.dumps(row)}")
    return row


def speed(row) -> str:
    return "-" if row["vs_gpu"] is None else f"{row['vs_gpu']:.2f}x"


def table(rows, env) -> str:
    head = (f"{'ctx':>6} {'mode':>10} {'host':>4} {'kv':>5} {'decode ms':>10} {'tok/s':>7} "
            f"{'speed':>7} {'prefill s':>9} {'GPU KV':>10} {'host KV':>10}")
    lines = [" | ".join(f"{k} {v}" for k, v in env.items()), head]
    for r in rows:
        prefill = f"{r['prefill_s']:.2f}" if "prefill_s" in r else "-"
        lines.append(f"{r['ctx'] // 1024:>5}k {r['mode']:>10} {r['host_layers']:>4} "
                     f"{r['kv_dtype']:>5} {r['decode_ms']:>10.2f} {r['tok_s']:>7.2f} "
                     f"{speed(r):>7} {prefill:>9} {format_bytes(r['gpu_bytes']):>10} "
                     f"{format_bytes(r['host_bytes']):>10}")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ctx", default="32k,128k")
    parser.add_argument("--host", default="4,16", help="host layer counts to try")
    parser.add_argument("--modes", default="prefetch,cpu,split")
    parser.add_argument("--cpu-shares", default="0.45",
                        help="split mode: shares of each host layer's rows the CPU attends")
    parser.add_argument("--fp8", action="store_true", help="fp8 KV for the offloaded stores")
    parser.add_argument("--prefill-ctx", default="32k",
                        help="ctx at which prefill is timed (0: none)")
    parser.add_argument("--chunk", type=int, default=8192)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=6)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch default)")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--device", default="cuda", help="cpu only for a smoke test")
    args = parser.parse_args()
    args.prefill_ctx = 0 if args.prefill_ctx in ("0", "none") else parse_ctx(args.prefill_ctx)
    if args.threads:
        torch.set_num_threads(args.threads)
    env = environment()
    log(json.dumps(env))
    device = torch.device(args.device)
    h2d = pinned_h2d_gbps() if device.type == "cuda" else float("nan")
    cpu = cpu_attention_gbps()
    log(f"pinned H2D {h2d:.1f} GB/s; CPU attention reads {cpu:.1f} GB/s "
        f"({torch.get_num_threads()} threads)")
    together = concurrent_host_reads() if device.type == "cuda" else {}
    weights = torch.randn(HIDDEN, LAYER_PARAMS // HIDDEN, dtype=DTYPE, device=device) * 1e-2
    rows = []
    for ctx in map(parse_ctx, filter(None, args.ctx.split(","))):
        log(f"ctx {ctx}: all-GPU")
        try:
            rows.append(run_case(args, "gpu", ctx, 0, weights, None))
            baseline = rows[-1]["decode_ms"] / 1e3
        except torch.cuda.OutOfMemoryError:  # 256K of Llama-7B KV (128 GiB) fits no single GPU
            log(f"ctx {ctx}: all-GPU KV does not fit; no baseline")
            baseline = None
            torch.cuda.empty_cache()
        for host in map(int, args.host.split(",")):
            layer_bytes = 2 * ctx * HEADS * HEAD_DIM * (1.03 if args.fp8 else 2)
            log(f"ctx {ctx}, {host} host layers {sorted(host_layer_set(host))}: PCIe-bound "
                f"prefetch ~{host * layer_bytes / h2d / 1e6:.1f} ms, DRAM-bound cpu "
                f"~{host * layer_bytes / cpu / 1e6:.1f} ms per token")
            for mode in args.modes.split(","):
                shares = map(float, args.cpu_shares.split(",")) if mode == "split" else [0.0]
                for share in shares:
                    rows.append(run_case(args, mode, ctx, host, weights, baseline, share))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"env": env, "h2d_gbps": h2d, "cpu_attention_gbps": cpu,
               "host_reads_gbps": together, "rows": rows}
    (out / "offload.json").write_text(json.dumps(payload, indent=2))
    (out / "offload.log").write_text("\n".join(LOG_LINES) + "\n")
    print(table(rows, env))


if __name__ == "__main__":
    main()
