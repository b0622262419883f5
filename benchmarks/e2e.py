"""End to end: `facli bench` reports as markdown, each run's tables and its targets, met or not.

On the GPU machines (one H200, then two):
    facli bench --synthetic llama-7b --depth 8k,32k,128k,256k --json-out $OUT/e2e-1gpu.json
    facli bench --synthetic llama-7b --depth 8k,32k,128k,256k --devices 2 --json-out $OUT/e2e-2gpu.json
Then here:
    python benchmarks/e2e.py e2e-1gpu.json e2e-2gpu.json --print
prints the tables that docs/performance.md takes its end-to-end figures from; without --print
they replace the "End to end" section of the file that --docs names.
"""

import argparse
import json
import re
import sys
from pathlib import Path

from facli.bench.report import format_report
from facli.units import format_ctx

SECTION = "## End to end"
DOCS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
INTRO = """\
`facli bench` (script: `benchmarks/e2e.py` renders its JSON here). Per context depth: the prompt is
random ASCII filling the depth less the decode tokens and 8; TTFT is prefill plus the first
token; decode tok/s is over the remaining tokens; peak is `torch.cuda.max_memory_allocated` per
device (the largest rank shown), next to the plan's prediction for the depth and its error
(`+` = predicted high). `HF` is transformers' own model (sdpa attention) on the same GPU, weights
and prompt, in the same run, after facli's memory is released. Warm-up (Triton compilation, CUDA
graph capture) happens before each measured depth. The bound is the HBM bandwidth limit on decode:
weights plus the KV cache at the mean decode length, read once per token."""


def _at(report: dict, depth: int, key: str):
    for row in report.get("comparison") or []:
        if row and row["depth"] == depth:
            return row.get(key)
    return None


def _bound_fraction(report: dict, depth: int):
    for record in report["facli"]["depths"]:
        if record["depth"] == depth and record.get("bandwidth"):
            return record["bandwidth"]["fraction_of_bound"]
    return None


def _worst(report: dict, key: str):
    values = [r["error_pct"][key] for r in report["facli"]["depths"]
              if r.get("error_pct") and r["error_pct"].get(key) is not None]
    return max(values, key=abs) if values else None


def targets(report: dict) -> list[tuple[str, str, str]]:
    """(target, measured, met) for the issue's targets that this report can speak to."""
    rows = []
    prefill = [_at(report, d, "prefill_tokens_per_s") for d in (32768, 65536, 131072)]
    prefill = [p for p in prefill if p is not None]
    rows.append(_row("prefill tok/s >= 1.2x transformers at 32K-128K", min(prefill) if prefill else None,
                     lambda v: v >= 1.2, "{:.2f}x (lowest)"))
    rows.append(_row("decode tok/s >= 5x transformers at 32K", _at(report, 32768, "decode_tokens_per_s"),
                     lambda v: v >= 5, "{:.1f}x"))
    rows.append(_row("decode at 32K within 1.5x of the HBM bound", _bound_fraction(report, 32768),
                     lambda v: v >= 1 / 1.5, "{:.0%} of the bound"))
    rows.append(_row("largest context >= 2x transformers'", report["largest_context"]["ratio"],
                     lambda v: v >= 2, "{:.1f}x"))
    rows.append(_row("plan peak memory error < 5%", _worst(report, "peak_gpu_bytes"),
                     lambda v: abs(v) < 5, "{:+.1f}% (worst)"))
    for key, name in (("ttft_s", "TTFT"), ("decode_tokens_per_s", "decode tok/s")):
        rows.append(_row(f"plan {name} error < 20%", _worst(report, key), lambda v: abs(v) < 20,
                         "{:+.1f}% (worst)"))
    return rows


def _row(target: str, value, test, fmt: str) -> tuple[str, str, str]:
    if value is None:
        return target, "not measured", "-"
    return target, fmt.format(value), "yes" if test(value) else "no"


def render_run(report: dict) -> str:
    env, request = report["environment"], report["request"]
    where = f"{request['devices']} x {env['gpus'][0]}" if env["gpus"] else f"{request['devices']} x CPU"
    source = (f" --synthetic {request['synthetic']}" if request.get("synthetic")
              else f" --model {request['model']}" if request.get("model") else "")
    depths = ",".join(format_ctx(d) for d in request["depths"])
    lines = [f"### {where}, {report['facli']['model']}", "",
             f"`facli bench{source} --depth {depths} --devices {request['devices']} "
             f"--decode-tokens {request['decode_tokens']}`", "", format_report(report), ""]
    if report["transformers"] is not None:
        lines += ["| target | measured | met |", "| --- | --- | --- |"]
        lines += [f"| {t} | {m} | {ok} |" for t, m, ok in targets(report)]
        lines.append("")
    return "\n".join(lines)


def replace_section(text: str, body: str) -> str:
    """`text` with the SECTION heading's content (up to the next `## ` heading) set to `body`."""
    block = f"{SECTION}\n\n{body.rstrip()}\n"
    match = re.search(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", text, flags=re.S | re.M)
    if match is None:
        return text.rstrip() + "\n\n" + block
    following = "\n" if match.end() < len(text) else ""
    return text[:match.start()] + block + following + text[match.end():]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reports", nargs="+", type=Path, help="JSON files written by facli bench --json-out")
    parser.add_argument("--docs", type=Path, default=DOCS)
    parser.add_argument("--print", action="store_true", help="print the section instead of writing it")
    args = parser.parse_args(argv)
    runs = [render_run(json.loads(path.read_text())) for path in args.reports]
    body = INTRO + "\n\n" + "\n".join(runs)
    if args.print:
        print(body)
        return 0
    text = args.docs.read_text() if args.docs.is_file() else "# facli benchmarks\n"
    args.docs.write_text(replace_section(text, body))
    print(f"wrote {SECTION!r} of {args.docs}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
