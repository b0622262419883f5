"""`facli generate`: one prompt in, generated text streamed out."""

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from facli import options
from facli.errors import FacliError
from facli.prompt_text import read_prompt
from facli.units import parse_ctx


def generate(
    prompt: Annotated[Optional[str], typer.Option(metavar="TEXT", help="Prompt text.")] = None,
    prompt_file: Annotated[Optional[Path], typer.Option(metavar="FILE", help="Read the prompt from this UTF-8 file (- reads standard input).")] = None,
    chat: Annotated[bool, typer.Option("--chat", help="Send the prompt as a user message through the model's chat template (instruction-tuned models).")] = False,
    system: Annotated[Optional[str], typer.Option(metavar="TEXT", help="With --chat: a system message before the prompt.")] = None,
    model: options.Model = None,
    ctx: options.Ctx = None,
    allow_ctx_extension: options.AllowCtxExtension = False,
    max_new_tokens: options.MaxNewTokens = 64,
    stop: Annotated[Optional[list[str]], typer.Option(metavar="TEXT", help="Stop before this text (repeat for several); it is not printed.")] = None,
    temperature: options.Temperature = 0.0,
    top_p: options.TopP = 1.0,
    top_k: options.TopK = 0,
    seed: options.Seed = 0,
    repetition_penalty: options.RepetitionPenalty = 1.0,
    no_repeat_ngram_size: options.NoRepeatNgramSize = 0,
    dtype: options.Dtype = "auto",
    kv_dtype: options.KvDtype = "auto",
    device: options.Device = None,
    devices: options.Devices = "1",
    prefill_chunk: options.PrefillChunk = None,
    decode_mode: options.DecodeMode = "auto",
    allreduce_tile_tokens: options.AllreduceTileTokens = None,
    force: Annotated[bool, typer.Option("--force", help="Run even when the plan says it will not fit.")] = False,
    eager: Annotated[bool, typer.Option("--eager", help="Run decode steps eagerly instead of replaying CUDA graphs.")] = False,
    as_json: options.Json = False,
):
    """Generate text from a prompt; text streams to stdout as it is produced."""
    if max_new_tokens <= 0:
        raise FacliError(f"expected --max-new-tokens > 0, got {max_new_tokens}")
    stops = tuple(stop or ())
    if any(not text for text in stops):
        raise FacliError("expected a non-empty --stop string; drop the empty one")
    if system is not None and not chat:
        raise FacliError("expected --system together with --chat; add --chat to use the model's "
                         "chat template")
    ranks = options.parse_count(devices, "--devices")
    text = read_prompt(prompt, prompt_file)
    # The run stack (torch) loads once the options above are known good: a typo fails at once.
    from facli.generation import plan_and_generate
    from facli.run.sampling import SamplingParams
    from facli.run_options import RunOptions
    sampling = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                              repetition_penalty=repetition_penalty,
                              no_repeat_ngram_size=no_repeat_ngram_size)
    run_options = RunOptions(
        model=model, device=device, dtype=dtype, kv_dtype=kv_dtype,
        ctx=parse_ctx(ctx) if ctx is not None else None, prefill_chunk=prefill_chunk,
        devices=ranks or 1, decode_mode=decode_mode, force=force,
        allow_ctx_extension=allow_ctx_extension, cuda_graphs=not eager,
        allreduce_tile_tokens=allreduce_tile_tokens,
    )
    result = plan_and_generate(run_options, text, sampling, max_new_tokens, stream=not as_json,
                               chat=chat, system=system, stop=stops, auto_devices=ranks is None)
    if as_json:
        print(json.dumps(result))
    else:
        print()
