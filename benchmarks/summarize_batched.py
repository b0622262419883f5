"""`facli summarize` over many documents: one at a time against decoded together in rows.

Usage: python benchmarks/summarize_batched.py [--documents 48] [--shortest 1024] [--longest 4096]
    [--new-tokens 128] [--batches 1,8,auto,auto:fp8] [--transformers-batch 8] [--extra-lengths 32768]
    [--out DIR]
Builds a Llama-7B-shaped random bf16 checkpoint (benchmarks/common.py), writes documents of
random ASCII with lengths spread evenly between --shortest and --longest tokens (one token per
character under its byte-level tokenizer), plus one document per --extra-lengths entry (a mixed
corpus: the short ones and a few long ones), and runs `facli summarize --json` on the folder as
a fresh process once per --batches entry (a batch, or auto; ":fp8" adds --kv-dtype fp8), each
into its own output. The checkpoint's greedy
tokens are all text (write_random_checkpoint's `decodable`), and EOS, one id of hundreds, hardly
ever comes, so every document generates --new-tokens. Prints documents/s and tokens/s per
batch, and how many summaries equal the one-at-a-time run's (bf16 GEMMs over several rows round
differently from one row's, so greedy paths may part). The baseline in the same run: Hugging
Face transformers' `generate` on the same prompt ids, --transformers-batch documents at a time
with left padding (0: not run).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import LLAMA_7B, print_environment, random_text, write_random_checkpoint  # noqa: E402

TEMPLATE_TOKENS = 256  # room left for the prompt template


def write_corpus(folder: Path, count: int, shortest: int, longest: int,
                 extra_lengths: list[int]) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    lengths = [shortest + (longest - shortest) * index // max(count - 1, 1) for index in range(count)]
    for index, length in enumerate(lengths + extra_lengths):
        (folder / f"doc-{index:03d}.txt").write_text(random_text(length - TEMPLATE_TOKENS, seed=index))


def run(corpus: Path, checkpoint: Path, out: Path, entry: str, ctx: int, new_tokens: int,
        index: int) -> dict:
    """The index-th --batches entry: a batch (a number or auto), with ":fp8" for an fp8 KV
    cache. An entry may come twice: the second run finds the kernels compiled."""
    batch, _, kv_dtype = entry.partition(":")
    folder = out / f"run-{index}-batch-{entry.replace(':', '-')}"
    shutil.rmtree(folder, ignore_errors=True)  # a fresh output: nothing to resume
    folder.mkdir(parents=True)
    results = folder / "summaries.jsonl"
    command = [sys.executable, "-P", "-m", "facli.cli", "summarize", str(corpus), "--model",
               str(checkpoint), "--out", str(results), "--ctx", str(ctx),
               "--max-new-tokens", str(new_tokens), "--allow-ctx-extension", "--json"]
    if batch != "auto":
        command += ["--batch", batch]
    if kv_dtype:
        command += ["--kv-dtype", kv_dtype]
    began = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=out)
    wall = time.perf_counter() - began
    (folder / "stderr.txt").write_text(done.stderr)
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-4000:])
        raise SystemExit(f"facli summarize --batch {entry} failed with exit code {done.returncode}")
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    records = {r["id"]: r for r in map(json.loads, results.read_text().splitlines())}
    lines = done.stderr.splitlines()
    rows = "\n".join(line for line in lines
                     if "rows decoded together" in line or "decode steps with" in line)
    # The run's own plan (budget as detected) and forecast, for calibrating the planner.
    plan = "\n".join(line for line in lines
                     if line.startswith(("facli: plan:", "facli: predicted:", "facli: hint:")))
    return {"batch": entry, "summary": summary, "records": records, "wall_s": wall,
            "rows_line": rows, "plan_lines": plan}


def run_transformers(corpus: Path, checkpoint: Path, batch: int, new_tokens: int) -> dict:
    """The documents' summarize prompts (facli's template, so the same ids) through
    transformers' generate, `batch` at a time, left-padded; seconds from the model loaded."""
    import torch
    import transformers

    from facli.summarize.documents import discover, read_documents
    from facli.summarize.planning import tokenize
    from facli.summarize.prompting import make_prompts

    tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint, local_files_only=True)
    prompts = make_prompts(tokenizer, None)
    prepared = tokenize(read_documents(discover([corpus]), lambda *_: None), prompts)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = transformers.AutoModelForCausalLM.from_pretrained(
        checkpoint, dtype=torch.bfloat16, attn_implementation="sdpa").to(device)
    model.generation_config.eos_token_id = None
    records = {}
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    began = time.perf_counter()
    for start in range(0, len(prepared), batch):
        group = prepared[start:start + batch]
        ids = [prompts.summarize.build(list(item.ids)) for item in group]
        width = max(map(len, ids))
        padded = torch.tensor([[0] * (width - len(row)) + row for row in ids], device=device)
        mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in ids], device=device)
        try:
            out = model.generate(padded, attention_mask=mask, max_new_tokens=new_tokens,
                                 do_sample=False, pad_token_id=0)
        except torch.OutOfMemoryError:
            return {"batch": batch, "error": "out of memory"}
        for item, row in zip(group, out[:, width:].tolist()):
            records[item.document.id] = {"summary": tokenizer.decode(row, skip_special_tokens=True),
                                         "generated_tokens": len(row)}
    sync()
    seconds = time.perf_counter() - began
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    return {"batch": batch, "seconds": seconds, "records": records, "peak_gpu_bytes": peak}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--documents", type=int, default=48)
    parser.add_argument("--shortest", type=int, default=1024)
    parser.add_argument("--longest", type=int, default=4096)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batches", default="1,8,auto")
    parser.add_argument("--transformers-batch", type=int, default=8)
    parser.add_argument("--extra-lengths", default="", help="comma-separated token lengths of "
                        "documents added to the evenly spread ones")
    parser.add_argument("--corpus", default="/tmp/summarize-corpus")
    parser.add_argument("--checkpoint", default="/tmp/llama-7b-random-decodable")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--model-config", default=None, help="JSON of config.json values (tests)")
    args = parser.parse_args()
    env = print_environment()
    config = json.loads(args.model_config) if args.model_config else LLAMA_7B
    checkpoint = write_random_checkpoint(Path(args.checkpoint), config, decodable=True)
    out = Path(args.out)
    corpus = Path(args.corpus)
    extra = [int(length) for length in args.extra_lengths.split(",") if length]
    write_corpus(corpus, args.documents, args.shortest, args.longest, extra)
    ctx = max([args.longest] + extra) + args.new_tokens
    runs = [run(corpus, checkpoint, out, entry, ctx, args.new_tokens, index)
            for index, entry in enumerate(args.batches.split(","))]
    baseline = (run_transformers(corpus, checkpoint, args.transformers_batch, args.new_tokens)
                if args.transformers_batch else None)
    (out / "summarize_batched.json").write_text(json.dumps(
        {"env": env, "args": vars(args), "runs": runs, "transformers": baseline}, indent=2))
    reference = runs[0]["records"]
    # Seconds of the document loop (the model loaded); the wall time adds start-up and loading.
    print(f"\n{'batch':>6}{'docs':>6}{'new tok':>9}{'seconds':>9}{'wall s':>8}{'docs/s':>8}"
          f"{'tok/s':>9}{'speedup':>9}{'same as ' + runs[0]['batch']:>11}")
    for result in runs:
        summary, records = result["summary"], result["records"]
        seconds = summary["generation_s"]
        same = sum(records[key]["summary"] == reference[key]["summary"] for key in reference)
        print(f"{result['batch']:>6}{summary['done']:>6}{summary['generated_tokens']:>9}"
              f"{seconds:>9.1f}{result['wall_s']:>8.1f}{summary['done'] / seconds:>8.2f}"
              f"{summary['generated_tokens'] / seconds:>9.0f}"
              f"{runs[0]['summary']['generation_s'] / seconds:>8.2f}x{same:>7}/{len(reference)}")
    if baseline and "error" in baseline:
        print(f"transformers batch {baseline['batch']}: {baseline['error']}")
    elif baseline:
        records, seconds = baseline["records"], baseline["seconds"]
        tokens = sum(r["generated_tokens"] for r in records.values())
        same = sum(records[key]["summary"] == reference[key]["summary"] for key in reference)
        print(f"transformers generate, {baseline['batch']} at a time (left-padded): {len(records)} "
              f"docs, {tokens} new tokens in {seconds:.1f} s, {len(records) / seconds:.2f} docs/s, "
              f"{tokens / seconds:.0f} tok/s, {same}/{len(reference)} same as facli --batch "
              f"{runs[0]['batch']}")
    for result in runs:
        for line in result["rows_line"].splitlines():
            print(f"--batch {result['batch']}: {line}")


if __name__ == "__main__":
    main()
