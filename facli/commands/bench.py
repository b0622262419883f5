"""`facli bench`: per context depth, facli's speed and memory next to its plan and transformers."""

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from facli import options
from facli.errors import FacliError
from facli.units import parse_batch, parse_ctx


def parse_depths(text: str) -> tuple[int, ...]:
    """`8k,32k,128k` -> (8192, 32768, 131072)."""
    parts = [part for part in text.split(",") if part.strip()]
    if not parts:
        raise FacliError(f"expected --depth as a comma list such as 8k,32k,128k, got {text!r}")
    return tuple(parse_ctx(part) for part in parts)


def command(
    depth: Annotated[str, typer.Option(metavar="TOKENS,...", help="Context depths to measure, comma separated: 8k,32k,128k,256k (k = 1024).")] = "8k,32k",
    ctx: options.Ctx = None,
    model: options.Model = None,
    synthetic: Annotated[Optional[str], typer.Option(metavar="NAME", help="A model recipe (e.g. llama-7b) whose shape gets random weights made on the device: no checkpoint needed.")] = None,
    decode_tokens: Annotated[int, typer.Option(metavar="N", help="Tokens decoded at each depth (all of them: EOS is ignored).")] = 64,
    baseline: Annotated[str, typer.Option(metavar="transformers|none", help="transformers (its own model on the same device, in the same run, on one device) or none.")] = "transformers",
    devices: options.Devices = "1",
    device: options.Device = None,
    dtype: options.Dtype = "auto",
    prefill_chunk: options.PrefillChunk = None,
    kv_dtype: options.KvDtype = "auto",
    decode_mode: options.DecodeMode = "auto",
    allreduce_tile_tokens: options.AllreduceTileTokens = None,
    batch: options.Batch = "1",
    repeats: Annotated[int, typer.Option(metavar="N", help="Rounds of facli and transformers at every depth, each side going first in turn; each speed figure is the median of the rounds (a shared CPU varies from run to run).")] = 1,
    as_json: options.Json = False,
    json_out: Annotated[Optional[Path], typer.Option(metavar="FILE", help="Write the whole report to this JSON file (checked before the run starts).")] = None,
    plot: Annotated[Optional[Path], typer.Option(metavar="FILE", help="Write a PNG of tokens/s and peak memory against depth (needs matplotlib).")] = None,
):
    """Measure time to first token, prefill and decode tokens/s and peak memory per context depth.

    --ctx plans every depth's KV cache for that context; with --batch, tokens/s count all rows."""
    from facli.bench.plot import write_plot
    from facli.bench.report import format_report, require_matplotlib, write_json
    from facli.bench.request import BenchRequest
    from facli.bench.run import planned_devices, run_bench
    from facli.run_options import RunOptions

    if plot is not None:
        options.check_output_file(plot, "--plot")
        require_matplotlib()
    if json_out is not None:
        options.check_output_file(json_out, "--json-out")
    depths, rows = parse_depths(depth), parse_batch(batch)
    context = parse_ctx(ctx) if ctx is not None else None
    ranks = options.parse_count(devices, "--devices")
    if ranks is None:
        ranks = planned_devices(model, synthetic, device, context or max(depths), dtype, kv_dtype,
                                decode_mode, rows)
    run = RunOptions(model=model, device=device, dtype=dtype, kv_dtype=kv_dtype, ctx=context,
                     prefill_chunk=prefill_chunk, devices=ranks, decode_mode=decode_mode,
                     allreduce_tile_tokens=allreduce_tile_tokens, batch=rows)
    request = BenchRequest(depths=depths, run=run, synthetic=synthetic,
                           decode_tokens=decode_tokens, baseline=baseline, repeats=repeats)
    report = run_bench(request)
    print(format_report(report), flush=True)
    if plot is not None:
        write_plot(report, plot)
    if json_out is not None:
        write_json(report, json_out)
    if as_json:
        print(json.dumps(report))

