"""`facli bench`: per context depth, facli's speed and memory next to its plan and transformers."""

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from facli.errors import FacliError
from facli.units import parse_batch, parse_ctx


def parse_depths(text: str) -> tuple[int, ...]:
    """`8k,32k,128k` -> (8192, 32768, 131072)."""
    parts = [part for part in text.split(",") if part.strip()]
    if not parts:
        raise FacliError(f"expected --depth as a comma list such as 8k,32k,128k, got {text!r}")
    return tuple(parse_ctx(part) for part in parts)


def command(
    depth: Annotated[str, typer.Option(help="Context depths to measure, comma separated: 8k,32k,128k,256k (k = 1024).")] = "8k,32k",
    ctx: Annotated[Optional[str], typer.Option(help="Plan and allocate the KV cache for this context at every depth (as `generate --ctx` does); default: each depth's own.")] = None,
    model: Annotated[Optional[str], typer.Option(help="Checkpoint directory or recipe name; default: the embedded demo model.")] = None,
    synthetic: Annotated[Optional[str], typer.Option(help="A model recipe (e.g. llama-7b) whose shape gets random weights made on the device: no checkpoint needed.")] = None,
    decode_tokens: Annotated[int, typer.Option(help="Tokens decoded at each depth (all of them: EOS is ignored).")] = 64,
    baseline: Annotated[str, typer.Option(help="transformers (its own model on the same device, in the same run) or none.")] = "transformers",
    devices: Annotated[int, typer.Option(help="Tensor-parallel ranks for facli (GPUs, or gloo ranks with --device cpu); the baseline uses one device.")] = 1,
    device: Annotated[Optional[str], typer.Option(help="cpu or cuda (default: cuda when available).")] = None,
    dtype: Annotated[str, typer.Option(help="auto, bf16, fp16 or fp32; auto is the checkpoint's, bf16 for --synthetic on GPUs.")] = "auto",
    prefill_chunk: Annotated[Optional[int], typer.Option(help="Prompt tokens per prefill step (default: from the plan).")] = None,
    kv_dtype: Annotated[str, typer.Option(help="facli's KV cache dtype: auto (the weights') or fp8 (e4m3, half the bytes); the baseline keeps its own.")] = "auto",
    decode_mode: Annotated[str, typer.Option(help="For host-resident KV: auto, prefetch, cpu or split.")] = "auto",
    allreduce_tile_tokens: Annotated[Optional[int], typer.Option(help="Tokens per tiling-AllReduce tile with --devices > 1 (default: the plan's, from the hardware).")] = None,
    batch: Annotated[str, typer.Option(help="Prompts decoded together at each depth, one per row of the KV cache (the baseline generates them as one batch); tokens/s then count every row's. auto: as many as keep the cache on the GPUs at each depth (up to 64).")] = "1",
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Write every figure to this JSON file, and print it as one JSON object on the last stdout line.")] = None,
    plot: Annotated[Optional[Path], typer.Option(help="Write a PNG of tokens/s and peak memory against depth (needs matplotlib).")] = None,
):
    """Measure time to first token, prefill and decode tokens/s and peak memory per context depth."""
    from facli.bench import BenchRequest, run_bench
    from facli.bench_report import format_report, require_matplotlib

    if plot is not None:
        require_matplotlib()
    request = BenchRequest(
        depths=parse_depths(depth), model=model, synthetic=synthetic, decode_tokens=decode_tokens,
        devices=devices, device=device, dtype=dtype, prefill_chunk=prefill_chunk, baseline=baseline,
        kv_dtype=kv_dtype, decode_mode=decode_mode, allreduce_tile_tokens=allreduce_tile_tokens,
        ctx=parse_ctx(ctx) if ctx is not None else None, batch=parse_batch(batch),
    )
    report = run_bench(request)
    print(format_report(report), flush=True)
    if plot is not None:
        from facli.bench_plot import write_plot

        write_plot(report, plot)
    if json_path is not None:
        try:
            json_path.write_text(json.dumps(report, indent=2) + "\n")
        except OSError as error:
            raise FacliError(f"expected a writable --json path, got {json_path}: {error.strerror}") from None
        print(json.dumps(report))
