"""Where a graphed decode step's time goes, kernel by kernel, at a few context depths.

Usage: python benchmarks/decode_profile.py [--model llama-7b] [--depths 8k,32k] [--steps 20]
       [--out DIR]
Builds the recipe's shape with random bf16 weights on the GPU (as `facli bench --synthetic`),
prefills `depth` tokens, then replays decode steps through the engine's CUDA graph: first timed
alone (CUDA events around each step), then under torch.profiler. Per depth it prints the step
time, the kernels' summed device time per step and the difference (gaps between kernels), and
the kernels grouped by name with their count and time per step. Full rows go to
DIR/decode_profile.json.
"""

import argparse
import json
import os
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment  # noqa: E402

from facli.models.resolve import synthetic_model  # noqa: E402
from facli.parallel.context import ParallelContext  # noqa: E402
from facli.run.runtime import load_runtime  # noqa: E402
from facli.run_options import RunOptions  # noqa: E402
from facli.units import parse_ctx  # noqa: E402


def step_ms(engine, token, position: int, steps: int) -> float:
    """Median milliseconds of one graphed decode step (events around each replay)."""
    times = []
    for i in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        engine.decode_step(token, position + i)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def kernel_table(engine, token, position: int, steps: int) -> dict[str, tuple[float, float]]:
    """{kernel name: (calls per step, device microseconds per step)} under the profiler."""
    activities = [torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as profile:
        for i in range(steps):
            engine.decode_step(token, position + i)
        torch.cuda.synchronize()
    calls, micros = defaultdict(int), defaultdict(float)
    for event in profile.events():
        if event.device_type == torch.autograd.DeviceType.CUDA and event.device_time > 0:
            calls[event.name] += 1
            micros[event.name] += event.device_time
    return {name: (calls[name] / steps, micros[name] / steps) for name in calls}


def short(name: str, width: int = 70) -> str:
    return name if len(name) <= width else name[:width - 3] + "..."


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-7b", help="a model recipe")
    parser.add_argument("--depths", default="8k,32k")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    depths = [parse_ctx(d) for d in args.depths.split(",")]
    env = environment()
    options = RunOptions(dtype="bf16", device="cuda", ctx=max(depths) + 4 * args.steps,
                         allow_ctx_extension=True)
    runtime = load_runtime(options, synthetic_model(args.model), ParallelContext())
    engine = runtime.engine
    generator = torch.Generator(device="cuda").manual_seed(0)
    rows, lines = [], []
    for depth in depths:
        ids = torch.randint(0, runtime.config.vocab_size, (1, depth), device="cuda",
                            generator=generator)
        engine.prefill(ids)
        token = ids[:, -1]
        for i in range(3):  # capture and warm-up
            engine.decode_step(token, depth + i)
        measured = step_ms(engine, token, depth + 3, args.steps)
        kernels = kernel_table(engine, token, depth + 3 + args.steps, args.steps)
        busy = sum(us for _, us in kernels.values()) / 1e3
        count = sum(n for n, _ in kernels.values())
        rows.append({"depth": depth, "step_ms": measured, "kernel_ms": busy,
                     "kernels_per_step": count,
                     "kernels": {name: {"calls": n, "us": us} for name, (n, us) in kernels.items()}})
        lines.append(f"\ndepth {depth}: step {measured:.3f} ms, kernels {busy:.3f} ms "
                     f"({count:.0f} per step), gaps {measured - busy:.3f} ms")
        lines.append(f"{'kernel':72}{'calls':>7}{'us/step':>10}{'us/call':>9}{'share':>7}")
        for name, (n, us) in sorted(kernels.items(), key=lambda item: -item[1][1]):
            lines.append(f"{short(name):72}{n:>7.0f}{us:>10.1f}{us / n:>9.2f}"
                         f"{us / 1e3 / measured:>7.1%}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode_profile.json").write_text(json.dumps({"env": env, "rows": rows}, indent=2))
    print(" | ".join(f"{k} {v}" for k, v in env.items()))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
