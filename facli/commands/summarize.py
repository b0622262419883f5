"""`facli summarize`: summarize a folder of documents into a resumable JSONL file."""

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from facli import options
from facli.errors import FacliError
from facli.summarize.files import check_output_path
from facli.summarize.prompting import SUMMARY_REPETITION_PENALTY
from facli.summarize.strategies import Strategy
from facli.units import parse_batch, parse_ctx


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
    check_output_path(out)  # before any model, hardware or document is looked at
    if hardware != "auto" and not plan_only:
        raise FacliError(f"expected --hardware only with --plan-only, got --hardware {hardware} "
                         "for a run; a run plans on the machine it runs on")
    tokens = parse_ctx(ctx) if ctx is not None else None
    rows, ranks = parse_batch(batch), options.parse_count(devices, "--devices")
    # The run stack (torch) loads once the options above are known good: a typo fails at once.
    from facli.run.sampling import SamplingParams
    from facli.run_options import RunOptions
    from facli.summarize.corpus import SummarizeRequest
    from facli.summarize.forecast import forecast_run, format_forecast
    from facli.summarize.planning import auto_devices, hardware_spec
    from facli.summarize.run import run_on_ranks
    spec = hardware_spec(hardware, device)
    if ranks is None:
        ranks = auto_devices(model, tokens, spec, dtype=dtype, kv_dtype=kv_dtype,
                             decode_mode=decode_mode, batch=rows)

    run = RunOptions(model=model, device=device, dtype=dtype, kv_dtype=kv_dtype, ctx=tokens,
                     devices=ranks, decode_mode=decode_mode,
                     allreduce_tile_tokens=allreduce_tile_tokens,
                     allow_ctx_extension=allow_ctx_extension, batch=rows)
    request = SummarizeRequest(
        inputs=tuple(inputs), out=out, run=run, max_new_tokens=max_new_tokens,
        prompt_template=prompt_template, strategy=strategy, retry_failed=retry_failed,
        hardware=spec,
        sampling=SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                                repetition_penalty=repetition_penalty,
                                no_repeat_ngram_size=no_repeat_ngram_size),
    )
    if plan_only:
        forecast = forecast_run(request)
        print(format_forecast(forecast, out))
        if as_json:
            print(json.dumps(forecast.to_dict(out)))
        return
    summary = run_on_ranks(request)
    if as_json:
        print(json.dumps({"output": str(out), **summary.as_dict()}))
    if summary.interrupted:
        raise typer.Exit(code=130)
    if summary.none_succeeded:  # the records of the failures stay in the output
        raise FacliError(summary.failure_line(out))

