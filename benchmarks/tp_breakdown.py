"""Where tensor-parallel prefill time goes: GPU kernel time by kind, per collective mode.

    python benchmarks/tp_breakdown.py --devices 2 --layers 8 --lengths 32k,128k --out $OUT

The Llama-7B-shaped model of tensor_parallel.py with fewer layers, timed over several
interleaved repeats per mode (median), then once under torch.profiler on each rank: device time
of the GEMMs, the attention kernel, the copy-engine sums (pair_sum, its wait for the peer's
flag included), other elementwise kernels, NCCL and peer copies. The GEMMs' growth over
nocomm is what communication beside them costs them; the sums' time is what the copy engines
add on the SMs. Results: OUT/tp_breakdown.jsonl, a table last.
"""

import argparse
import json
import os
import statistics
from dataclasses import replace
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from facli.parallel.launch import launch
from facli.units import parse_ctx

from tensor_parallel import LLAMA_7B, MODES, SMOKE, build_model, environment, kv_cache, set_mode, timed

KINDS = ("gemm", "attention", "pair_sum", "nccl", "copy", "other")


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    if "nccl" in lowered:
        return "nccl"
    if "memcpy" in lowered:
        return "copy"
    if "pair_sum" in lowered:
        return "pair_sum"
    if "prefill" in lowered:
        return "attention"
    if any(key in lowered for key in ("gemm", "nvjet", "cutlass", "xmma", "cublas")):
        return "gemm"
    return "other"


def device_ms(prof) -> tuple[dict, dict]:
    """Device milliseconds by kind, and by kernel name."""
    by_kind, by_name = dict.fromkeys(KINDS, 0.0), {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            ms = event.time_range.elapsed_us() / 1e3
            by_kind[kernel_kind(event.name)] += ms
            by_name[event.name] = by_name.get(event.name, 0.0) + ms
    return by_kind, by_name


def main_stream_gaps(prof) -> dict:
    """Idle time of the busiest stream, in ms, by the name of the kernel that ends each gap
    (what the stream waited to start: a flag, a launch, another stream)."""
    streams: dict = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            streams.setdefault(event.device_resource_id, []).append(event)
    if not streams:
        return {}
    busiest = max(streams.values(), key=lambda events: sum(e.time_range.elapsed_us() for e in events))
    busiest.sort(key=lambda e: e.time_range.start)
    gaps: dict = {}
    for before, after in zip(busiest, busiest[1:]):
        idle = after.time_range.start - before.time_range.end
        if idle > 0:
            name = after.name[:60]
            gaps[name] = gaps.get(name, 0.0) + idle / 1e3
    return dict(sorted(gaps.items(), key=lambda item: -item[1])[:10])


def run_rank(parallel, args):
    device = torch.device("cuda", parallel.local_rank) if args.device_type == "cuda" else torch.device("cpu")
    model = build_model(args.config, parallel, device)
    kv = kv_cache(args.config, max(args.lengths) + 8, parallel.world_size, device)
    records = []
    for length in args.lengths:
        ids = torch.randint(0, args.config.vocab_size, (1, length), device=device,
                            generator=torch.Generator(device=device).manual_seed(5))
        for mode in args.modes:  # warm-up: compilation, cuBLAS plans, symmetric memory
            set_mode(model, parallel, mode, args.tile)
            model(ids, 0, kv)
        seconds = {mode: [] for mode in args.modes}
        for _ in range(args.reps):
            for mode in args.modes:
                local = set_mode(model, parallel, mode, args.tile)
                seconds[mode].append(timed(lambda: model(ids, 0, kv), local, device))
        for mode in args.modes:
            set_mode(model, parallel, mode, args.tile)
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
            with profile(activities=activities) as prof:
                model(ids, 0, kv)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
            by_kind, by_name = device_ms(prof)
            top = dict(sorted(by_name.items(), key=lambda item: -item[1])[:12])
            records.append(dict(kind="breakdown", rank=parallel.rank, tokens=length, mode=mode,
                                layers=args.config.num_hidden_layers, seconds=seconds[mode],
                                median_ms=1e3 * statistics.median(seconds[mode]),
                                device_ms=by_kind, top_kernels_ms=top, gaps_ms=main_stream_gaps(prof)))
    if args.trace and parallel.is_distributed:  # rank 0's records come back; the peer's go to a file
        path = args.out / f"tp_breakdown-rank{parallel.rank}.jsonl"
        path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return records


def table(records: list[dict]) -> str:
    rows = ["| tokens | rank | mode | median ms | exposed vs nocomm ms | "
            + " | ".join(f"{kind} ms" for kind in KINDS) + " |",
            "| --- " * (5 + len(KINDS)) + "|"]
    for r in records:
        base = next(q for q in records if q["tokens"] == r["tokens"] and q["rank"] == r["rank"]
                    and q["mode"] == "nocomm")
        exposed = r["median_ms"] - base["median_ms"]
        cells = [f"{r['device_ms'][kind]:.1f}" for kind in KINDS]
        rows.append(f"| {r['tokens']} | {r['rank']} | {r['mode']} | {r['median_ms']:.1f} | "
                    f"{exposed:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--lengths", default="32k,128k")
    parser.add_argument("--modes", default="nocomm,single,tiled-ce,tiled+mlp-ce")
    parser.add_argument("--tile", type=int, default=4096)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--trace", action="store_true", help="also write every rank's records to a file")
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU with gloo: checks the script")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".out")))
    args = parser.parse_args()
    args.lengths = [parse_ctx(v) for v in args.lengths.split(",")]
    args.modes = args.modes.split(",")
    unknown = set(args.modes) - set(MODES)
    if unknown or "nocomm" not in args.modes:
        parser.error(f"--modes must include nocomm and come from {', '.join(MODES)}")
    args.config = replace(SMOKE if args.smoke else LLAMA_7B, num_hidden_layers=args.layers)
    args.device_type = "cpu" if args.smoke else "cuda"
    args.out.mkdir(parents=True, exist_ok=True)
    with (args.out / "tp_breakdown.jsonl").open("w") as log:
        log.write(json.dumps(environment(args.device_type)) + "\n")
        records = launch(run_rank, (args,), world_size=args.devices, device_type=args.device_type)
        for record in records:
            log.write(json.dumps(record) + "\n")
    summary = table(records)
    (args.out / "tp_breakdown_table.md").write_text(summary + "\n")
    print(summary, flush=True)


if __name__ == "__main__":
    main()
