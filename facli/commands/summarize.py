"""`facli summarize`: summarize a folder of documents into a resumable JSONL file."""

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from facli.errors import FacliError
from facli.summarize.strategies import Strategy


def command(
    inputs: Annotated[list[Path], typer.Argument(help="Files and folders: .txt, .md, and .jsonl with a \"text\" field (and optional \"id\"); folders are searched recursively.")],
    out: Annotated[Path, typer.Option(help="Results file: one JSON line per document, appended as each finishes (in the order they finish).")],
    model: Annotated[Optional[str], typer.Option(help="Checkpoint directory or recipe name; default: the embedded demo model.")] = None,
    ctx: Annotated[Optional[str], typer.Option(help="Context per prompt: 4096, 32k, 256k, 1m. Default: the model's max_position_embeddings.")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Longest summary, in tokens.")] = 256,
    prompt_template: Annotated[Optional[Path], typer.Option(help="UTF-8 file with {document} where the document goes; the user message under a chat template, else the whole prompt.")] = None,
    strategy: Annotated[Strategy, typer.Option(help="Documents longer than --ctx: fit (record as failed), truncate (keep head and tail), map-reduce (summarize parts, then the summaries).")] = Strategy.FIT,
    retry_failed: Annotated[bool, typer.Option(help="Summarize again the documents recorded as failed.")] = False,
    temperature: Annotated[float, typer.Option(help="0 is greedy decoding.")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling threshold (1 keeps all).")] = 1.0,
    top_k: Annotated[int, typer.Option(help="Sample from the k most likely tokens (0 keeps all).")] = 0,
    seed: Annotated[int, typer.Option(help="Seed of the sampler, the same for every document.")] = 0,
    dtype: Annotated[str, typer.Option(help="auto, bf16, fp16 or fp32.")] = "auto",
    device: Annotated[Optional[str], typer.Option(help="cpu or cuda (default: cuda when available).")] = None,
    devices: Annotated[int, typer.Option(help="Tensor-parallel ranks (GPUs, or gloo ranks with --device cpu).")] = 1,
    allow_ctx_extension: Annotated[bool, typer.Option(help="Allow --ctx beyond the model's max_position_embeddings.")] = False,
    kv_dtype: Annotated[str, typer.Option(help="KV cache dtype: auto (the weights'), bf16, fp16, fp32 or fp8 (e4m3, half the bytes, lossy).")] = "auto",
    decode_mode: Annotated[str, typer.Option(help="For host-resident KV: auto, prefetch, cpu or split.")] = "auto",
    allreduce_tile_tokens: Annotated[Optional[int], typer.Option(help="Tokens per tiling-AllReduce tile with --devices > 1 (default: the plan's, from the hardware).")] = None,
    batch: Annotated[Optional[int], typer.Option(help="Prompts decoded together, each in its own row of the KV cache (default: documents grouped by length, each group in as many rows as fit in GPU memory with the whole cache there, up to 64; 1 runs documents one after another).")] = None,
    plan_only: Annotated[bool, typer.Option(help="Print the documents still to do, their groups and rows, each group's memory plan and predicted time, and stop: no weights are read and nothing is written.")] = False,
    hardware: Annotated[Optional[str], typer.Option(help="With --plan-only: plan for this hardware recipe (see `facli recipes`) instead of this machine.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the run summary (or with --plan-only, the plan) as one JSON object.")] = False,
):
    """Summarize documents; rerun the same command to resume after a crash or Ctrl-C."""
    from facli.summarize.files import check_output_path

    check_output_path(out)  # before any model, hardware or document is looked at
    from facli.parallel.launch import launch
    from facli.resolve import resolve_device
    from facli.sampling import SamplingParams
    from facli.summarize.run import SummarizeRequest, summarize_on_rank
    from facli.units import parse_ctx

    if hardware is not None and not plan_only:
        raise FacliError(f"expected --hardware only with --plan-only, got --hardware {hardware} "
                         "for a run; a run plans on the machine it runs on")

    request = SummarizeRequest(
        inputs=tuple(inputs), out=out, model=model,
        ctx=parse_ctx(ctx) if ctx is not None else None, max_new_tokens=max_new_tokens,
        prompt_template=prompt_template, strategy=strategy, device=device, dtype=dtype,
        devices=devices, retry_failed=retry_failed, allow_ctx_extension=allow_ctx_extension,
        kv_dtype=kv_dtype, decode_mode=decode_mode, allreduce_tile_tokens=allreduce_tile_tokens,
        batch=batch, hardware=_hardware(hardware, device),
        sampling=SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed),
    )
    if plan_only:
        _print_forecast(request, as_json)
        return
    device_type = resolve_device(device).type
    summary = launch(summarize_on_rank, (request,), world_size=devices, device_type=device_type)
    if as_json:
        print(json.dumps({"output": str(out), **summary.as_dict()}))
    if summary.interrupted:
        raise typer.Exit(code=130)
    if summary.none_succeeded:  # the records of the failures stay in the output
        raise FacliError(summary.failure_line(out))


def _print_forecast(request, as_json: bool) -> None:
    from facli.summarize.forecast import forecast_run, format_forecast

    run = forecast_run(request)
    print(format_forecast(run, request.out))
    if as_json:
        print(json.dumps(run.to_dict(request.out)))


def _hardware(recipe: str | None, device: str | None):
    """The spec to plan on: a named recipe (--plan-only), else this machine (summarize_hardware)."""
    from facli.summarize.planning import summarize_hardware

    if recipe is None:
        return summarize_hardware(device)
    from facli.offload.hardware import load_hardware

    return load_hardware(recipe)
