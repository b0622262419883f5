"""Decode's matrix-vector products: which PyTorch call reads the weights fastest at one token.

Usage: python benchmarks/gemv.py [--model llama-7b] [--tp 1] [--calls 16] [--out DIR]
For each projection of the recipe's layer (merged qkv, o_proj, merged gate_up, down_proj) in
bf16: `F.linear` on a [1, 1, K] activation (what the model calls), and `torch.mv` on the
weight and a [K] vector. Each is timed inside one CUDA graph of --calls calls cycling over
enough weight copies to overflow L2 (decode replays graphs, and each layer's weights are read
once), so the figure is HBM-bound time, not launch time. Prints us per call and the weights'
read rate; writes DIR/gemv.json.
"""

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment  # noqa: E402

from facli.recipe_loader import load_model_recipe  # noqa: E402

L2_BYTES = 60 * 1024**2  # more than an H100's or H200's 50 MiB


def projections(config, tp: int) -> dict[str, tuple[int, int]]:
    """(out features, in features) per rank of each projection of one layer."""
    h, d = config.hidden_size, config.head_dim
    q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
    inter = config.intermediate_size
    return {"qkv": ((q + 2 * kv) // tp, h), "o_proj": (h, q // tp),
            "gate_up": (2 * inter // tp, h), "down_proj": (h, inter // tp)}


def graph_us(calls, count: int) -> float:
    """Microseconds per call of `calls` (a list of closures), replayed in one CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for call in calls[:2]:
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(count):
            calls[i % len(calls)]()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / count)
    return sorted(times)[len(times) // 2]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-7b")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--calls", type=int, default=16)
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    env = environment()
    config = load_model_recipe(args.model).config
    rows = []
    for name, (out_features, in_features) in projections(config, args.tp).items():
        nbytes = out_features * in_features * 2
        copies = max(2, -(-L2_BYTES // nbytes) + 1)
        weights = [torch.randn(out_features, in_features, device="cuda", dtype=torch.bfloat16)
                   for _ in range(copies)]
        x = torch.randn(1, 1, in_features, device="cuda", dtype=torch.bfloat16)
        vector = x.view(-1)
        linear = graph_us([lambda w=w: F.linear(x, w) for w in weights], args.calls)
        mv = graph_us([lambda w=w: torch.mv(w, vector) for w in weights], args.calls)
        torch.testing.assert_close(torch.mv(weights[0], vector), F.linear(x, weights[0]).view(-1),
                                   rtol=2e-2, atol=2e-2)
        rows.append({"projection": name, "out": out_features, "in": in_features,
                     "weight_bytes": nbytes, "linear_us": linear, "mv_us": mv})
        del weights
        torch.cuda.empty_cache()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gemv.json").write_text(json.dumps({"env": env, "rows": rows}, indent=2))
    print(" | ".join(f"{k} {v}" for k, v in env.items()))
    print(f"{'projection':12}{'shape':>14}{'MB':>8}{'linear us':>11}{'TB/s':>7}{'mv us':>9}{'TB/s':>7}")
    for r in rows:
        mb = r["weight_bytes"] / 1e6
        print(f"{r['projection']:12}{r['out']:>7}x{r['in']:<6}{mb:>8.1f}{r['linear_us']:>11.2f}"
              f"{mb / r['linear_us']:>7.2f}{r['mv_us']:>9.2f}{mb / r['mv_us']:>7.2f}")


if __name__ == "__main__":
    main()
