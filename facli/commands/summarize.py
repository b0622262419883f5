"""`facli summarize`: summarize a folder of documents into a resumable JSONL file."""

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from facli import options
from facli.errors import FacliError
from facli.summarize.prompting import SUMMARY_REPETITION_PENALTY
from facli.summarize.strategies import Strategy


def command(
    inputs: Annotated[list[Path], typer.Argument(metavar="PATH", help="Files and folders: .txt, .md, and .jsonl with a \"text\" field (and optional \"id\"); folders are searched recursively.")],
    out: Annotated[Path, typer.Option(metavar="FILE", help="Results file: one JSON line per document, appended as each finishes (in the order they finish).")],
    model: options.Model = None,
    ctx: options.Ctx = None,
    allow_ctx_extension: options.AllowCtxExtension = False,
    max_new_tokens: options.MaxNewTokens = 256,
    prompt_template: Annotated[Optional[Path], typer.Option(metavar="FILE", help="UTF-8 file with {document} where the document goes; the user message under a chat template, else the whole prompt.")] = None,
    strategy: Annotated[Strategy, typer.Option(metavar="fit|truncate|map-reduce", help="Documents longer than --ctx: fit (record as failed), truncate (keep head and tail), map-reduce (summarize parts, then the summaries).")] = Strategy.FIT,
    retry_failed: Annotated[bool, typer.Option("--retry-failed", help="Summarize again the documents recorded as failed.")] = False,
    temperature: options.Temperature = 0.0,
    top_p: options.TopP = 1.0,
    top_k: options.TopK = 0,
    seed: options.Seed = 0,
    repetition_penalty: options.RepetitionPenalty = SUMMARY_REPETITION_PENALTY,
    no_repeat_ngram_size: options.NoRepeatNgramSize = 0,
    dtype: options.Dtype = "auto",
    device: options.Device = None,
    devices: options.Devices = "1",
    kv_dtype: options.KvDtype = "auto",
    decode_mode: options.DecodeMode = "auto",
    allreduce_tile_tokens: options.AllreduceTileTokens = None,
    batch: options.Batch = "auto",
    plan_only: Annotated[bool, typer.Option("--plan-only", help="Print the documents still to do, their groups and rows, each group's memory plan and predicted time, and stop: no weights are read and nothing is written.")] = False,
    hardware: options.Hardware = "auto",
    as_json: options.Json = False,
):
    """Summarize documents; rerun the same command to resume after a crash or Ctrl-C.

    --json prints the run's summary, or with --plan-only the plan; --hardware needs --plan-only."""
    from facli.summarize.files import check_output_path

    check_output_path(out)  # before any model, hardware or document is looked at
    from facli.parallel.launch import launch
    from facli.resolve import resolve_device
    from facli.sampling import SamplingParams
    from facli.summarize.run import SummarizeRequest, summarize_on_rank
    from facli.units import parse_batch, parse_ctx

    if hardware != "auto" and not plan_only:
        raise FacliError(f"expected --hardware only with --plan-only, got --hardware {hardware} "
                         "for a run; a run plans on the machine it runs on")
    tokens = parse_ctx(ctx) if ctx is not None else None
    rows, ranks = parse_batch(batch), options.parse_count(devices, "--devices")
    spec = _hardware(hardware, device)
    if ranks is None:
        ranks = _planned_devices(model, tokens, spec, dtype, kv_dtype, decode_mode, rows)

    request = SummarizeRequest(
        inputs=tuple(inputs), out=out, model=model, ctx=tokens, max_new_tokens=max_new_tokens,
        prompt_template=prompt_template, strategy=strategy, device=device, dtype=dtype,
        devices=ranks, retry_failed=retry_failed, allow_ctx_extension=allow_ctx_extension,
        kv_dtype=kv_dtype, decode_mode=decode_mode, allreduce_tile_tokens=allreduce_tile_tokens,
        batch=rows, hardware=spec,
        sampling=SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                                repetition_penalty=repetition_penalty,
                                no_repeat_ngram_size=no_repeat_ngram_size),
    )
    if plan_only:
        _print_forecast(request, as_json)
        return
    device_type = resolve_device(device).type
    summary = launch(summarize_on_rank, (request,), world_size=ranks, device_type=device_type)
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


def _planned_devices(model, ctx, spec, dtype, kv_dtype, decode_mode, rows) -> int:
    """`--devices auto`: the planner's degree for the model's config at --ctx (else its trained
    length), read without weights."""
    from facli.recipe_loader import resolve_model_config

    name, config = resolve_model_config(model)
    return options.planned_devices(config, name, spec, ctx or config.max_position_embeddings,
                                   dtype=dtype, kv_dtype=kv_dtype, decode_mode=decode_mode,
                                   batch=rows or 1)


def _hardware(recipe: str, device: str | None):
    """The spec to plan on: a named recipe (--plan-only), else this machine (summarize_hardware)."""
    from facli.summarize.planning import summarize_hardware

    if recipe == "auto":
        return summarize_hardware(device)
    from facli.planner.hardware import load_hardware

    return load_hardware(recipe)
