"""Decode's matrix-vector products: cuBLAS against facli's kernel (facli.kernels.gemv_triton).

Usage: python benchmarks/gemv.py [--model llama-7b] [--tp 1] [--calls 16] [--sweep] [--out DIR]
For each projection of the recipe's layer (merged qkv, o_proj, merged gate_up, down_proj) and
the LM head, in bf16 at one token: `F.linear` on a [1, 1, K] activation (cuBLAS, what the model
called before), `torch.mv`, and `gemv_triton` with the configuration `gemv_config` picks; with
--sweep also every configuration of SWEEP. Each is timed inside one CUDA graph of --calls calls
cycling over enough weight copies to overflow L2 (decode replays graphs, and each layer's
weights are read once), so the figure is HBM-bound time, not launch time. Prints us per call
and the weights' read rate; writes DIR/gemv.json.
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

from facli.kernels.gemv_triton import GemvConfig, gemv_config, gemv_triton  # noqa: E402
from facli.models.recipe_loader import load_model_recipe  # noqa: E402

L2_BYTES = 60 * 1024**2  # more than an H100's or H200's 50 MiB
SWEEP = [GemvConfig(block_n, block_k, warps) for block_n in (2, 4, 8, 16)
         for block_k in (256, 512) for warps in (4, 8)]


def projections(config, tp: int) -> dict[str, tuple[int, int]]:
    """(out features, in features) per rank of each projection of one layer."""
    h, d = config.hidden_size, config.head_dim
    q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
    inter = config.intermediate_size
    return {"qkv": ((q + 2 * kv) // tp, h), "o_proj": (h, q // tp),
            "gate_up": (2 * inter // tp, h), "down_proj": (h, inter // tp),
            "lm_head": (config.vocab_size // tp, h)}


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
    parser.add_argument("--sweep", action="store_true", help="also time every config of SWEEP")
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
        row = {"projection": name, "out": out_features, "in": in_features, "weight_bytes": nbytes,
               "linear_us": graph_us([lambda w=w: F.linear(x, w) for w in weights], args.calls),
               "mv_us": graph_us([lambda w=w: torch.mv(w, vector) for w in weights], args.calls)}
        chosen = gemv_config(out_features, in_features)
        torch.testing.assert_close(gemv_triton(x, weights[0]), F.linear(x, weights[0]),
                                   rtol=2e-2, atol=2e-2)
        row["facli_us"] = graph_us([lambda w=w: gemv_triton(x, w) for w in weights], args.calls)
        row["facli_config"] = vars(chosen)
        if args.sweep:
            row["sweep"] = [{**vars(c), "us": graph_us(
                [lambda w=w, c=c: gemv_triton(x, w, config=c) for w in weights], args.calls)}
                for c in SWEEP]
        rows.append(row)
        del weights
        torch.cuda.empty_cache()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gemv.json").write_text(json.dumps({"env": env, "rows": rows}, indent=2))
    print(" | ".join(f"{k} {v}" for k, v in env.items()))
    if args.sweep:
        for r in rows:
            best = sorted(r["sweep"], key=lambda c: c["us"])[:4]
            print(r["projection"], "fastest:", "; ".join(
                f"n{c['block_n']} k{c['block_k']} w{c['num_warps']} {c['us']:.2f} us" for c in best))
    print(f"{'projection':12}{'shape':>14}{'MB':>8}{'cuBLAS us':>11}{'TB/s':>7}{'mv us':>9}"
          f"{'TB/s':>7}{'facli us':>10}{'TB/s':>7}")
    for r in rows:
        mb = r["weight_bytes"] / 1e6
        print(f"{r['projection']:12}{r['out']:>7}x{r['in']:<6}{mb:>8.1f}{r['linear_us']:>11.2f}"
              f"{mb / r['linear_us']:>7.2f}{r['mv_us']:>9.2f}{mb / r['mv_us']:>7.2f}"
              f"{r['facli_us']:>10.2f}{mb / r['facli_us']:>7.2f}")


if __name__ == "__main__":
    main()
