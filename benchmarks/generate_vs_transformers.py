"""`facli generate` vs transformers on one GPU: TTFT and decode tokens/s at a given context.

Usage: python benchmarks/generate_vs_transformers.py --ctx 32k [--new-tokens 64] [--out DIR]
Builds a Llama-7B-shaped random bf16 checkpoint, runs `facli generate --json` on a prompt that
fills the context, then transformers' LlamaForCausalLM (sdpa) on the same checkpoint and prompt.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import print_environment, random_text, write_random_checkpoint  # noqa: E402

from facli.units import parse_ctx  # noqa: E402


def run_facli(checkpoint: Path, prompt_file: Path, ctx: int, new_tokens: int, extra: list[str]) -> dict:
    command = [sys.executable, "-P", "-m", "facli.cli", "generate", "--model", str(checkpoint),
               "--prompt-file", str(prompt_file), "--ctx", str(ctx), "--max-new-tokens",
               str(new_tokens), "--json", *extra]
    result = subprocess.run(command, capture_output=True, text=True)
    sys.stderr.write(result.stderr[-3000:])
    if result.returncode != 0:
        return {"error": result.stderr.strip().splitlines()[-1] if result.stderr else "failed"}
    return json.loads(result.stdout.strip().splitlines()[-1])


def run_transformers(checkpoint: Path, prompt: str, new_tokens: int) -> dict:
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint, local_files_only=True)
    ids = tokenizer(prompt, return_tensors="pt").input_ids.cuda()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        checkpoint, dtype=torch.bfloat16, attn_implementation="sdpa", device_map="cuda")
    model.generation_config.eos_token_id = None
    torch.cuda.reset_peak_memory_stats()

    def timed(n):
        torch.cuda.synchronize()
        start = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                       do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        return time.perf_counter() - start

    try:
        ttft = timed(1)
        total = timed(new_tokens)
    except torch.OutOfMemoryError:
        return {"error": "out of memory"}
    return {"ttft_s": ttft, "decode_tokens_per_s": (new_tokens - 1) / (total - ttft),
            "peak_gpu_bytes": torch.cuda.max_memory_allocated()}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--ctx", default="32k")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--checkpoint", default="/tmp/llama-7b-random")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--facli-args", default="")
    args = parser.parse_args()
    env = print_environment()
    ctx = parse_ctx(args.ctx)
    checkpoint = write_random_checkpoint(Path(args.checkpoint))
    prompt = random_text(ctx - args.new_tokens - 8)
    prompt_file = Path(args.out) / "prompt.txt"
    prompt_file.write_text(prompt)
    facli_result = run_facli(checkpoint, prompt_file, ctx, args.new_tokens, args.facli_args.split())
    prompt_file.unlink()
    hf_result = {} if args.skip_transformers else run_transformers(checkpoint, prompt, args.new_tokens)
    (Path(args.out) / f"generate_{args.ctx}.json").write_text(json.dumps(
        {"env": env, "ctx": ctx, "facli": facli_result, "transformers": hf_result}, indent=2))
    print(f"\nctx {args.ctx}, {args.new_tokens} new tokens, Llama-7B shape, bf16")
    print(f"{'':14}{'TTFT s':>10}{'decode tok/s':>14}{'peak GiB':>10}")
    for name, result in (("facli", facli_result), ("transformers", hf_result)):
        if "error" in result or not result:
            print(f"{name:14}{result.get('error', 'skipped'):>34}")
            continue
        peak = (result.get("peak_gpu_bytes") or 0) / 2**30
        print(f"{name:14}{result['ttft_s']:>10.2f}{result['decode_tokens_per_s']:>14.1f}{peak:>10.1f}")


if __name__ == "__main__":
    main()
