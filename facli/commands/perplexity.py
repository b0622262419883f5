"""`facli perplexity`: how well a model predicts a text, by sliding windows."""

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from facli import options as shared
from facli.prompt_text import read_prompt
from facli.units import parse_ctx


def command(
    # Named, as options.Dtype is: typer 0.27 names an option after a metavar spelling its parameter.
    file: Annotated[Path, typer.Option(
        "--file", metavar="FILE", help="UTF-8 text to score (- reads standard input).")],
    model: shared.Model = None,
    ctx: shared.Ctx = None,
    stride: Annotated[Optional[int], typer.Option(
        metavar="TOKENS",
        help="Tokens each window moves by; each window scores only the tokens past the previous "
             "one's end, with everything before them in the window as context (transformers' "
             "perplexity guide; llama.cpp's perplexity tool is stride = ctx/2). Left out: "
             "ctx/2.")] = None,
    allow_ctx_extension: shared.AllowCtxExtension = False,
    dtype: shared.Dtype = "auto",
    kv_dtype: shared.KvDtype = "auto",
    device: shared.Device = None,
    devices: shared.Devices = "1",
    prefill_chunk: shared.PrefillChunk = None,
    as_json: shared.Json = False,
):
    """Perplexity of a text under a model, with tokens/s: windows run through the same chunked
    prefill and KV cache as generate, so --kv-dtype fp8 and offloaded layers show their cost."""
    from facli.perplexity import run_perplexity
    from facli.run_options import RunOptions

    ranks = shared.parse_count(devices, "--devices") or 1
    text = read_prompt(None, file)
    window = parse_ctx(ctx) if ctx is not None else None
    run = RunOptions(model=model, device=device, dtype=dtype, kv_dtype=kv_dtype, ctx=window,
                     prefill_chunk=prefill_chunk, devices=ranks,
                     allow_ctx_extension=allow_ctx_extension)
    result = run_perplexity(text, file, run, stride=stride,
                            default_window=shared.PERPLEXITY_WINDOW)
    if as_json:
        print(json.dumps(result))
    else:
        print(f"perplexity {result['perplexity']:.4f} over {result['scored_tokens']} tokens "
              f"(mean NLL {result['mean_nll']:.4f}); {result['tokens_per_s']:.1f} tokens/s, "
              f"KV {result['kv_dtype']}")
