"""Decode in a KV cache planned for a long context, with host layers: the engine's graphs (GPU
layers captured, host layers eager between them) against an all-eager step, in the same run.

Usage: python benchmarks/offloaded_decode.py [--model llama-7b] [--ctx 256k] [--prompts 1k,32k]
       [--tokens 64] [--modes prefetch,cpu,split] [--out DIR]
Builds the recipe's shape with random bf16 weights on one GPU and plans for --ctx (on an H200,
Llama-7B at 256K keeps 4 layers' KV in pinned host memory). For each prompt length it decodes
--tokens greedy tokens after the prompt in each host decode mode (default: the plan's) twice,
with the same model and KV store: through the graphed engine and through an eager one. Prints
tok/s of each, the speedup and the plan's prediction for the prompt in that mode; full rows go
to DIR/offloaded_decode.json.
"""

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment  # noqa: E402

from facli.engine import Engine  # noqa: E402
from facli.offload.planner import predict_prompt  # noqa: E402
from facli.parallel.context import ParallelContext  # noqa: E402
from facli.resolve import synthetic_model  # noqa: E402
from facli.runtime import Runtime, RuntimeOptions  # noqa: E402
from facli.sampling import Sampler, SamplingParams  # noqa: E402
from facli.units import parse_ctx  # noqa: E402


def decode_rate(engine: Engine, prompt: list[int], tokens: int) -> tuple[float, list[int]]:
    """Steady decode tok/s (the first step, which may capture graphs, excluded) and the tokens."""
    sampler = Sampler(SamplingParams(temperature=0.0), engine.device)
    run = engine.generate(prompt, max_new_tokens=tokens, sampler=sampler)
    return run.timings.decode_tokens_per_s, run.token_ids


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-7b", help="a model recipe")
    parser.add_argument("--ctx", default="256k")
    parser.add_argument("--prompts", default="1k,32k")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--modes", default=None, help="host decode modes, comma separated")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    env = environment()
    options = RuntimeOptions(dtype="bf16", device="cuda", ctx=parse_ctx(args.ctx),
                             allow_ctx_extension=True)
    runtime = Runtime(synthetic_model(args.model), options, ParallelContext())
    plan = runtime.plan
    graphed = runtime.engine
    eager = Engine(runtime.model, runtime.kv, prefill_chunk=runtime.prefill_chunk, use_graphs=False)
    print(f"{plan.summary_line()}; host layers {sorted(plan.host.layers)}", flush=True)
    generator = torch.Generator().manual_seed(0)
    modes = args.modes.split(",") if args.modes else [plan.decode_mode]
    rows = []
    for text in args.prompts.split(","):
        length = parse_ctx(text)
        prompt = torch.randint(0, runtime.config.vocab_size, (length,), generator=generator).tolist()
        for mode in modes:
            runtime.kv.decode_mode = mode  # the store's mode may change between steps
            graph_rate, graph_tokens = decode_rate(graphed, prompt, args.tokens)
            eager_rate, eager_tokens = decode_rate(eager, prompt, args.tokens)
            mode_plan = dataclasses.replace(plan, decode_mode=mode)
            _, predicted = predict_prompt(runtime.config, runtime.hardware, mode_plan, length)
            same = sum(a == b for a, b in zip(graph_tokens, eager_tokens))
            rows.append({"prompt_tokens": length, "decode_mode": mode,
                         "graphed_tokens_per_s": graph_rate, "eager_tokens_per_s": eager_rate,
                         "predicted_tokens_per_s": predicted, "same_tokens": same,
                         "tokens": len(graph_tokens)})
            print(f"prompt {length}, {mode}: graphed {graph_rate:.1f} tok/s, eager "
                  f"{eager_rate:.1f}, plan {predicted:.1f}; {same}/{len(graph_tokens)} tokens "
                  f"agree", flush=True)
    result = {"environment": env, "ctx": plan.ctx, "plan_decode_mode": plan.decode_mode,
              "host_layers": sorted(plan.host.layers), "cpu_share": plan.host_cpu_share,
              "tokens": args.tokens, "rows": rows}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "offloaded_decode.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{args.model} bf16, cache for {args.ctx}, {len(plan.host.layers)} host layers, "
          f"CPU share {plan.host_cpu_share:.2f} in split mode")
    print("| prompt | mode | graphed tok/s | eager tok/s | speedup | plan tok/s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['prompt_tokens']} | {row['decode_mode']} | {row['graphed_tokens_per_s']:.1f} | "
              f"{row['eager_tokens_per_s']:.1f} | "
              f"{row['graphed_tokens_per_s'] / row['eager_tokens_per_s']:.2f}x | "
              f"{row['predicted_tokens_per_s']:.1f} |")


if __name__ == "__main__":
    main()
