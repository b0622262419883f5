"""facli vs transformers on the CPU: prefill and decode at 128 to 8K prompt tokens, on the same
checkpoint, threads and dtype, in one process.

Usage: python benchmarks/cpu_vs_transformers.py [--checkpoint DIR] [--depths 128,512,2k,4k,8k]
       [--decode-tokens 32] [--threads N] [--dtype fp32] [--repeats 3] [--out DIR]
Without a config.json in DIR, writes a random checkpoint of SmolLM2-135M's shape there (Llama:
30 layers, hidden 576, 9 query / 3 KV heads of 64, intermediate 1536, vocab 49152, tied
embeddings) with facli's byte tokenizer; a trained checkpoint in DIR is used as it is.
facli runs through its runtime as `facli generate --device cpu` does (planned for prompt + decode
tokens, greedy); transformers through LlamaForCausalLM's own generate (attn_implementation
"sdpa"), the baseline of `facli bench`. At each depth the two alternate `--repeats` times, each
going first in turn, and the median of each's runs counts (other processes on a small CPU slow
single runs). Prefill is the time to the first token; decode tok/s is measured after it. Ratios are
facli / transformers in tok/s (above 1: facli faster). Rows go to OUT/cpu_vs_transformers.json.
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import environment, write_random_checkpoint  # noqa: E402

from facli.bench.baseline import TORCH_DTYPES, FirstTokenClock, build_model  # noqa: E402
from facli.bench.request import GREEDY, prompt_ids  # noqa: E402
from facli.models.resolve import resolve_model  # noqa: E402
from facli.run.runtime import Runtime, load_runtime  # noqa: E402
from facli.run_options import RunOptions  # noqa: E402
from facli.units import parse_ctx  # noqa: E402

SMOLLM2_135M = dict(
    model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
    num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
    max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
    bos_token_id=1, eos_token_id=2, tie_word_embeddings=True,
)
DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def run_facli(runtime: Runtime, ids: list[int], decode_tokens: int) -> dict:
    """One generate as `facli generate` runs it: planned for prompt + decode tokens."""
    runtime.reshape(ctx=len(ids) + decode_tokens)
    result = runtime.generate(ids, max_new_tokens=decode_tokens, sampling=GREEDY, ignore_eos=True)
    return {"ttft_s": result.ttft_s, "decode_tokens_per_s": result.decode_tokens_per_s,
            "prefill_chunk": runtime.prefill_chunk, "tokens": result.token_ids}


@torch.inference_mode()
def run_transformers(model, ids: list[int], decode_tokens: int) -> dict:
    """transformers' greedy generate, timed as `facli bench` times it (first token by a streamer)."""
    inputs = torch.tensor([ids])
    clock = FirstTokenClock()
    output = model.generate(inputs, attention_mask=torch.ones_like(inputs), do_sample=False,
                            max_new_tokens=decode_tokens, pad_token_id=0, streamer=clock)
    finished = time.perf_counter()
    tokens = output[0, len(ids):].tolist()
    return {"ttft_s": clock.first_token_at - clock.started,
            "decode_tokens_per_s": (len(tokens) - 1) / (finished - clock.first_token_at),
            "tokens": tokens}


def first_difference(a: list[int], b: list[int]) -> int | None:
    """Index of the first differing greedy token (None: the same tokens)."""
    for index, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return index
    return None if len(a) == len(b) else min(len(a), len(b))


def summary(runs: list[dict]) -> dict:
    """Medians over the runs (a quiet moment for one side moves a best-of figure, not these)."""
    return {"ttft_s": statistics.median(r["ttft_s"] for r in runs),
            "decode_tokens_per_s": statistics.median(r["decode_tokens_per_s"] or 0.0 for r in runs),
            "best_ttft_s": min(r["ttft_s"] for r in runs),
            "best_decode_tokens_per_s": max(r["decode_tokens_per_s"] or 0.0 for r in runs),
            "tokens": runs[0]["tokens"],
            "runs": [{k: v for k, v in r.items() if k != "tokens"} for r in runs]}


def same_tokens(difference: int | None) -> str:
    return "same" if difference is None else f"differ from token {difference}"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", default="/tmp/facli-smollm2-135m-shape")
    parser.add_argument("--depths", default="128,512,2k,4k,8k")
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPE_NAMES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    depths = [parse_ctx(d) for d in args.depths.split(",")]
    env = {**environment(), "cpu": cpu_model(), "threads": torch.get_num_threads(), "dtype": args.dtype}
    print(" | ".join(f"{k} {v}" for k, v in env.items()), flush=True)

    checkpoint = write_random_checkpoint(Path(args.checkpoint), SMOLLM2_135M)
    resolved = resolve_model(str(checkpoint))
    runtime = load_runtime(RunOptions(model=str(checkpoint), device="cpu", dtype=args.dtype,
                                      ctx=depths[0] + args.decode_tokens,
                                      allow_ctx_extension=True), resolved)
    hf = build_model(resolved, TORCH_DTYPES[DTYPE_NAMES[args.dtype]], torch.device("cpu"),
                     max(depths) + args.decode_tokens)
    prompt = prompt_ids(runtime.encode, max(depths))
    run_facli(runtime, prompt[:64], 4)  # warm-up: allocator, thread pool, first-call paths
    run_transformers(hf, prompt[:64], 4)

    rows = []
    for depth in depths:
        ids = prompt[:depth]
        facli_runs, hf_runs = [], []
        for repeat in range(args.repeats):  # alternating which goes first
            for run in (0, 1) if repeat % 2 == 0 else (1, 0):
                if run == 0:
                    facli_runs.append(run_facli(runtime, ids, args.decode_tokens))
                else:
                    hf_runs.append(run_transformers(hf, ids, args.decode_tokens))
        row = {"prompt_tokens": depth, "facli": summary(facli_runs), "transformers": summary(hf_runs)}
        row["first_token_difference"] = first_difference(row["facli"].pop("tokens"),
                                                         row["transformers"].pop("tokens"))
        rows.append(row)
        print(f"{depth} tokens: facli TTFT {row['facli']['ttft_s']:.2f} s, decode "
              f"{row['facli']['decode_tokens_per_s']:.1f} tok/s; transformers TTFT "
              f"{row['transformers']['ttft_s']:.2f} s, decode "
              f"{row['transformers']['decode_tokens_per_s']:.1f} tok/s", file=sys.stderr, flush=True)

    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "cpu_vs_transformers.json").write_text(json.dumps(
        {"env": env, "checkpoint": str(checkpoint), "decode_tokens": args.decode_tokens,
         "repeats": args.repeats, "rows": rows}, indent=2))
    print(f"\n{resolved.name}, {args.dtype}, {env['threads']} threads, {args.decode_tokens} decode tokens, "
          f"median of {args.repeats} runs each")
    print(f"{'prompt':>7} | {'prefill s facli':>15} {'HF':>7} | {'prefill tok/s facli':>19} {'HF':>7} "
          f"{'ratio':>6} | {'decode tok/s facli':>18} {'HF':>6} {'ratio':>6} | greedy tokens")
    for row in rows:
        n, ours, theirs = row["prompt_tokens"], row["facli"], row["transformers"]
        decode_ratio = ours["decode_tokens_per_s"] / theirs["decode_tokens_per_s"]
        print(f"{n:>7} | {ours['ttft_s']:>15.2f} {theirs['ttft_s']:>7.2f} | {n / ours['ttft_s']:>19.0f} "
              f"{n / theirs['ttft_s']:>7.0f} {theirs['ttft_s'] / ours['ttft_s']:>6.2f} | "
              f"{ours['decode_tokens_per_s']:>18.1f} {theirs['decode_tokens_per_s']:>6.1f} {decode_ratio:>6.2f} | "
              f"{same_tokens(row['first_token_difference'])}")


if __name__ == "__main__":
    main()
