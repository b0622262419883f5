"""`facli perplexity`: how well a model predicts a text, by sliding windows."""

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from facli import options as shared
from facli.errors import FacliError
from facli.units import parse_ctx

# A text shorter than this many windows of the default length is scored in one window.
DEFAULT_WINDOW = 4096


def command(
    file: Annotated[Path, typer.Option(
        metavar="FILE", help="UTF-8 text to score (- reads standard input).")],
    model: shared.Model = None,
    ctx: Annotated[Optional[str], typer.Option(
        metavar="TOKENS",
        help="Window length: 512, 4k, 32k (k = 1024). Left out: the model's "
             f"max_position_embeddings, at most {DEFAULT_WINDOW}, and at most the text.")] = None,
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
    from facli.commands.generate import read_prompt
    from facli.perplexity import PerplexityRequest, perplexity_on_rank
    from facli.parallel.degrees import check_tensor_parallel
    from facli.parallel.launch import launch
    from facli.placement import hardware_for, plan_run
    from facli.resolve import check_context, resolve_device, resolve_model, tokenizer_for
    from facli.runtime import RuntimeOptions

    ranks = shared.parse_count(devices, "--devices") or 1
    text = read_prompt(None, file)
    resolved = resolve_model(model)
    tokenizer = tokenizer_for(resolved)
    ids = tokenizer(text).input_ids
    if len(ids) < 2:
        raise FacliError(f"expected a text of at least 2 tokens in {file}, got {len(ids)}")
    limit = resolved.config.max_position_embeddings
    asked = parse_ctx(ctx) if ctx is not None else min(limit, DEFAULT_WINDOW)
    window = min(asked, len(ids))  # a text shorter than the window is one window
    step = stride if stride is not None else max(1, window // 2)
    if asked > window:
        step = min(step, window)
    if not 1 <= step <= window:
        raise FacliError(f"expected --stride from 1 to the window ({window} tokens), got {step}")
    check_context(resolved.config, window, allow_ctx_extension)
    check_tensor_parallel(resolved.config, ranks)
    run_device = resolve_device(device)
    hardware = hardware_for(run_device, None)
    run_options = RuntimeOptions(model=model, device=device, dtype=dtype, kv_dtype=kv_dtype,
                                 ctx=window, prefill_chunk=prefill_chunk, devices=ranks,
                                 allow_ctx_extension=allow_ctx_extension)
    plan = plan_run(resolved.config, resolved.name, hardware, ctx=window, world_size=ranks,
                    dtype=dtype, kv_dtype=kv_dtype, prefill_chunk=prefill_chunk,
                    decode_mode="auto", force=False)
    print(f"facli: {plan.summary_line()}", file=sys.stderr)
    print(f"facli: {len(ids)} tokens, windows of {window} every {step}", file=sys.stderr)
    request = PerplexityRequest(run_options, resolved, ids, step, hardware, tokenizer, plan)
    result = launch(perplexity_on_rank, (request,), world_size=ranks, device_type=run_device.type)
    if as_json:
        print(json.dumps(result))
    else:
        print(f"perplexity {result['perplexity']:.4f} over {result['scored_tokens']} tokens "
              f"(mean NLL {result['mean_nll']:.4f}); {result['tokens_per_s']:.1f} tokens/s, "
              f"KV {result['kv_dtype']}")
