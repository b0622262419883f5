"""What an fp8 KV cache costs in quality: `facli perplexity` of a real English text with the KV
cache in the weights' dtype and in fp8 (e4m3, a scale per token and head), window by window.

    python -P benchmarks/perplexity_kv.py --text /usr/share/common-licenses/GPL-3 \
        --windows 1k,2k,4k,8k --device cpu --json-out docs/results/perplexity-kv.json

The model is facli's default (SmolLM2-135M-Instruct) unless --model names another. Windows do
not overlap (--stride = window), so each configuration scores the same tokens. With
--transformers, transformers' own model (float32, sdpa) scores the same token ids in the same
windows too, the reference facli's perplexity with the weights' KV dtype must equal.
"""

import argparse
import json
import math
import os
import platform
import subprocess
import sys
from pathlib import Path

from facli.bench.environment import git_commit
from facli.units import parse_ctx

FACLI = str(Path(sys.executable).with_name("facli"))


def run(text: Path, window: int, kv_dtype: str, model: str | None, device: str) -> dict:
    command = [FACLI, "perplexity", "--file", str(text), "--ctx", str(window), "--stride",
               str(window), "--kv-dtype", kv_dtype, "--device", device, "--json"]
    if model:
        command += ["--model", model]
    done = subprocess.run(command, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise SystemExit(f"facli perplexity failed: {done.stderr.strip().splitlines()[-1]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def transformers_perplexity(text: Path, window: int, model: str | None) -> dict:
    """The windows of `facli perplexity --ctx window --stride window` scored by transformers'
    model: the same token ids (facli's tokenizer call), each window in one forward pass."""
    import torch
    from transformers import AutoModelForCausalLM

    from facli.perplexity import sliding_windows
    from facli.models.resolve import resolve_model, tokenizer_for

    resolved = resolve_model(model)
    ids = tokenizer_for(resolved)(text.read_text(encoding="utf-8")).input_ids
    reference = AutoModelForCausalLM.from_pretrained(resolved.path, dtype=torch.float32,
                                                     attn_implementation="sdpa")
    window = min(window, len(ids))
    nll, scored = 0.0, 0
    with torch.inference_mode():
        for part in sliding_windows(len(ids), window, window):
            tokens = torch.tensor([ids[part.begin:part.end]])
            logits = reference(tokens).logits[0]
            first = part.score_from - part.begin - 1  # position p predicts token p + 1
            for start in range(first, logits.shape[0] - 1, 1024):  # bounded log-softmax memory
                stop = min(start + 1024, logits.shape[0] - 1)
                log_probs = torch.log_softmax(logits[start:stop].double(), dim=-1)
                nll -= log_probs.gather(1, tokens[0, start + 1:stop + 1, None]).sum().item()
                scored += stop - start
    return {"perplexity": math.exp(nll / scored), "scored_tokens": scored}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text", type=Path, required=True)
    parser.add_argument("--windows", default="1k,2k,4k,8k")
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json-out", type=Path, default=None)
    parser.add_argument("--transformers", action="store_true",
                        help="score the same windows with transformers' model too (CPU, float32)")
    args = parser.parse_args()
    import torch

    environment = {"torch": torch.__version__, "threads": torch.get_num_threads(),
                   "cpu": platform.processor() or platform.machine(),
                   "commit": git_commit()["commit"], "text": args.text.name}
    print(" | ".join(f"{k} {v}" for k, v in environment.items()), flush=True)
    rows = []
    print("| window | scored tokens | KV weights' dtype | KV fp8 | fp8 / weights' | tok/s (weights', fp8) "
          "| transformers | weights' / transformers - 1 |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for window in (parse_ctx(w) for w in args.windows.split(",")):
        plain = run(args.text, window, "auto", args.model, args.device)
        fp8 = run(args.text, window, "fp8", args.model, args.device)
        row = {"window": window, "auto": plain, "fp8": fp8}
        reference = "- | -"
        if args.transformers:
            row["transformers"] = theirs = transformers_perplexity(args.text, window, args.model)
            assert theirs["scored_tokens"] == plain["scored_tokens"], (theirs, plain)
            reference = (f"{theirs['perplexity']:.4f} | "
                         f"{plain['perplexity'] / theirs['perplexity'] - 1:+.1e}")
        rows.append(row)
        print(f"| {window} | {plain['scored_tokens']} | {plain['perplexity']:.4f} "
              f"({plain['kv_dtype']}) | {fp8['perplexity']:.4f} | "
              f"{fp8['perplexity'] / plain['perplexity']:.4f} | "
              f"{plain['tokens_per_s']:.0f}, {fp8['tokens_per_s']:.0f} | {reference} |", flush=True)
        if args.json_out:  # after every row, so a run cut short keeps what it measured
            args.json_out.write_text(json.dumps({"environment": environment, "rows": rows},
                                                indent=2) + "\n")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
