"""`facli summarize` over a folder of long documents: documents, tokens and tokens/s.

Usage: python benchmarks/summarize_long.py [--lengths 8k,32k,64k,128k] [--new-tokens 64] [--out DIR]
Builds a Llama-7B-shaped random bf16 checkpoint (benchmarks/common.py), writes one random-ASCII
document per length (one token per character under its byte-level tokenizer), runs `facli
summarize --json` on the folder as a fresh process, and prints the run's figures.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import LLAMA_7B, print_environment, random_text, write_random_checkpoint  # noqa: E402

from facli.units import format_ctx, parse_ctx  # noqa: E402


def write_corpus(folder: Path, lengths: list[int], new_tokens: int) -> None:
    """One document per length, sized so that prompt + template + summary fits in it."""
    folder.mkdir(parents=True, exist_ok=True)
    for index, length in enumerate(lengths):
        text = random_text(length - new_tokens - 256, seed=index)
        (folder / f"doc-{index:02d}-{format_ctx(length)}.txt").write_text(text)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", default="8k,32k,64k,128k")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--checkpoint", default="/tmp/llama-7b-random")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--model-config", default=None, help="JSON of config.json values (tests)")
    args = parser.parse_args()
    env = print_environment()
    lengths = [parse_ctx(item) for item in args.lengths.split(",")]
    config = json.loads(args.model_config) if args.model_config else LLAMA_7B
    checkpoint = write_random_checkpoint(Path(args.checkpoint), config)
    out = Path(args.out)
    corpus = out / "corpus"
    write_corpus(corpus, lengths, args.new_tokens)
    results = out / "summaries.jsonl"
    command = [sys.executable, "-P", "-m", "facli.cli", "summarize", str(corpus), "--model",
               str(checkpoint), "--out", str(results), "--ctx", str(max(lengths)),
               "--max-new-tokens", str(args.new_tokens), "--allow-ctx-extension", "--json"]
    began = time.perf_counter()
    run = subprocess.run(command, capture_output=True, text=True, cwd=out)
    wall = time.perf_counter() - began
    sys.stderr.write(run.stderr[-4000:])
    if run.returncode != 0:
        raise SystemExit(f"facli summarize failed with exit code {run.returncode}")
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    records = [json.loads(line) for line in results.read_text().splitlines()]
    (out / "summarize_long.json").write_text(json.dumps(
        {"env": env, "lengths": lengths, "summary": summary, "records": records, "wall_s": wall},
        indent=2))
    print(f"\n{'document':22}{'prompt tok':>12}{'new tok':>9}{'seconds':>9}{'status':>8}")
    for record in records:
        print(f"{record['source'].split('/')[-1]:22}{record['prompt_tokens']:>12}"
              f"{record['generated_tokens']:>9}{record['seconds']:>9.2f}{record['status']:>8}")
    busy = sum(r["seconds"] for r in records)
    total = summary["prompt_tokens"] + summary["generated_tokens"]
    print(f"\n{summary['done']} done, {summary['failed']} failed; {total} tokens in {busy:.1f} s of "
          f"generation ({total / busy:.0f} tok/s), {wall:.1f} s wall including load")


if __name__ == "__main__":
    main()
