"""What an fp8 KV cache costs in quality: `facli perplexity` of a real English text with the KV
cache in the weights' dtype and in fp8 (e4m3, a scale per token and head), window by window.

    python -P benchmarks/perplexity_kv.py --text /usr/share/common-licenses/GPL-3 \
        --windows 1k,2k,4k,8k --device cpu --json-out docs/results/perplexity-kv.json

The model is facli's default (SmolLM2-135M-Instruct) unless --model names another. Windows do
not overlap (--stride = window), so each configuration scores the same tokens.
"""

import argparse
import json
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text", type=Path, required=True)
    parser.add_argument("--windows", default="1k,2k,4k,8k")
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args()
    import torch

    environment = {"torch": torch.__version__, "threads": torch.get_num_threads(),
                   "cpu": platform.processor() or platform.machine(),
                   "commit": git_commit()["commit"], "text": args.text.name}
    print(" | ".join(f"{k} {v}" for k, v in environment.items()), flush=True)
    rows = []
    print("| window | scored tokens | KV weights' dtype | KV fp8 | fp8 / weights' | tok/s (weights', fp8) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for window in (parse_ctx(w) for w in args.windows.split(",")):
        plain = run(args.text, window, "auto", args.model, args.device)
        fp8 = run(args.text, window, "fp8", args.model, args.device)
        rows.append({"window": window, "auto": plain, "fp8": fp8})
        print(f"| {window} | {plain['scored_tokens']} | {plain['perplexity']:.4f} "
              f"({plain['kv_dtype']}) | {fp8['perplexity']:.4f} | "
              f"{fp8['perplexity'] / plain['perplexity']:.4f} | "
              f"{plain['tokens_per_s']:.0f}, {fp8['tokens_per_s']:.0f} |", flush=True)
        if args.json_out:  # after every row, so a run cut short keeps what it measured
            args.json_out.write_text(json.dumps({"environment": environment, "rows": rows},
                                                indent=2) + "\n")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
