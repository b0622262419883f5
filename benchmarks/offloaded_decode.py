"""Decode in a KV cache planned for a long context, with host layers, four ways in one run.

Usage: python benchmarks/offloaded_decode.py [--model llama-7b] [--ctx 256k]
       [--prompts 1k,32k,120k] [--tokens 64] [--out DIR]
Builds the recipe's shape with random bf16 weights on one GPU and plans for --ctx (on an H200,
Llama-7B at 256K keeps 4 layers' KV in pinned host memory). For each prompt length it decodes
--tokens greedy tokens after the prompt, with the same model and KV store:
  - eager: every step eagerly, host layers streamed or split in the plan's mode and CPU share,
    as before decode steps with host layers replayed CUDA graphs;
  - graphed: the same, the steps replaying graphs (its greedy tokens must be eager's);
  - graphed, mode for the prompt: the decode mode and CPU share the runtime picks for it;
  - packed: the store as built by default, which keeps every host layer's rows in the staging
    slots while they fit (128K rows each here), with the runtime's pick.
Prints tok/s with the time model's prediction for each graphed run; full rows go to
DIR/offloaded_decode.json.
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

from facli.models.resolve import synthetic_model  # noqa: E402
from facli.parallel.context import ParallelContext  # noqa: E402
from facli.planner.search import predict_prompt  # noqa: E402
from facli.run.engine import Engine  # noqa: E402
from facli.run.runtime import load_runtime  # noqa: E402
from facli.run.sampling import Sampler, SamplingParams  # noqa: E402
from facli.run_options import RunOptions  # noqa: E402
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
    parser.add_argument("--prompts", default="1k,32k,120k")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    env = environment()
    options = RunOptions(dtype="bf16", device="cuda", ctx=parse_ctx(args.ctx),
                         allow_ctx_extension=True)
    runtime = load_runtime(options, synthetic_model(args.model), ParallelContext())
    plan = runtime.plan
    graphed = runtime.engine
    eager = Engine(runtime.model, runtime.kv, prefill_chunk=runtime.prefill_chunk, use_graphs=False)
    print(f"{plan.summary_line()}; host layers {sorted(plan.host.layers)}", flush=True)
    generator = torch.Generator().manual_seed(0)
    rows = []

    def placement(length, packed):
        """The plan, or as the time model sees an unpacked store: one whose capacity is the
        prompt (its slots then keep no prompt of 3 or more host layers whole)."""
        return plan if packed else dataclasses.replace(plan, ctx=length)

    def measure(engine, length, prompt, label, mode, share, packed):
        predicted = None  # the time model predicts graphed steps
        if engine is graphed:
            layout_plan = dataclasses.replace(placement(length, packed), decode_mode=mode)
            predicted = predict_prompt(runtime.config, runtime.hardware, layout_plan,
                                       length).decode_tokens_per_s
        runtime.kv.decode_mode, runtime.kv.cpu_share = mode, share
        runtime.kv.pack_slots = packed  # from the prefill's reset on
        rate, tokens = decode_rate(engine, prompt, args.tokens)
        rows.append({"prompt_tokens": length, "run": label, "decode_mode": mode, "cpu_share": share,
                     "packed": runtime.kv.packed, "tokens_per_s": rate,
                     "predicted_tokens_per_s": predicted, "tokens": tokens})
        print(f"prompt {length}, {label} {mode} (CPU share {share:.2f}, packed "
              f"{runtime.kv.packed}): {rate:.1f} tok/s, plan {predicted}", flush=True)

    for text in args.prompts.split(","):
        length = parse_ctx(text)
        prompt = torch.randint(0, runtime.config.vocab_size, (length,), generator=generator).tolist()
        as_planned = (plan.decode_mode, plan.host_cpu_share)
        measure(eager, length, prompt, "eager", *as_planned, packed=False)
        measure(graphed, length, prompt, "graphed", *as_planned, packed=False)
        chosen = predict_prompt(runtime.config, runtime.hardware, placement(length, False), length,
                                choose_mode=True)
        measure(graphed, length, prompt, "graphed, mode for the prompt", chosen.decode_mode,
                chosen.cpu_share, packed=False)
        chosen = runtime.decode_for_prompt(length)
        measure(graphed, length, prompt, "packed", chosen.decode_mode, chosen.cpu_share, packed=True)
    # Random weights give near-even logits, so another mode or share (another order of
    # summation) soon picks other tokens: only the graphed run in the eager run's mode and share
    # must agree with it token for token.
    eager_tokens = {r["prompt_tokens"]: r["tokens"] for r in rows if r["run"] == "eager"}
    for row in rows:
        tokens = row.pop("tokens")
        if row["run"] == "graphed":
            row["same_tokens"] = sum(a == b for a, b in zip(tokens, eager_tokens[row["prompt_tokens"]]))
    result = {"environment": env, "ctx": plan.ctx, "plan_decode_mode": plan.decode_mode,
              "host_layers": sorted(plan.host.layers), "cpu_share": plan.host_cpu_share,
              "tokens": args.tokens, "rows": rows}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "offloaded_decode.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{args.model} bf16, cache planned for {args.ctx}: {len(plan.host.layers)} host layers, "
          f"{plan.decode_mode} decode, CPU share {plan.host_cpu_share:.2f}")
    print("| prompt | run | mode | CPU share | packed | tok/s | plan tok/s | error | tokens as eager |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        predicted = row["predicted_tokens_per_s"]
        plan_cells = "- | -"
        if predicted is not None:
            plan_cells = f"{predicted:.1f} | {(predicted - row['tokens_per_s']) / row['tokens_per_s']:+.1%}"
        print(f"| {row['prompt_tokens']} | {row['run']} | {row['decode_mode']} | "
              f"{row['cpu_share']:.2f} | {'yes' if row['packed'] else 'no'} | "
              f"{row['tokens_per_s']:.1f} | {plan_cells} | "
              f"{row['same_tokens'] if 'same_tokens' in row else '-'} |")


if __name__ == "__main__":
    main()
