"""`facli plan-memory`: where weights, KV cache and activations go, and how long it should take."""

import sys
from typing import Annotated

import typer

from facli import options as shared
from facli.models.recipe_loader import resolve_model_config
from facli.planner.hardware import hardware_from_option
from facli.units import parse_batch, parse_ctx


def command(
    model: shared.Model = None,
    ctx: shared.Ctx = None,
    allow_ctx_extension: shared.AllowCtxExtension = False,
    batch: shared.Batch = "1",
    hardware: shared.Hardware = "auto",
    devices: shared.Devices = "auto",
    dtype: shared.Dtype = "auto",
    kv_dtype: shared.KvDtype = "auto",
    prefill_chunk: shared.PrefillChunk = None,
    decode_mode: shared.DecodeMode = "auto",
    allreduce_tile_tokens: shared.AllreduceTileTokens = None,
    margin: Annotated[str | None, typer.Option(
        metavar="SIZE|PCT",
        help="Memory kept free on each GPU: 2GiB, 512MiB or 5% (default 3%).")] = None,
    json: shared.Json = False,
) -> None:
    """Plan memory and predict time for a long-context run, before loading anything.

    A --ctx that generate would refuse (see --allow-ctx-extension) is planned, with a warning."""
    from facli.memory_plan import describe, plan_memory

    name, config = resolve_model_config(model)
    tokens = parse_ctx(ctx) if ctx is not None else config.max_position_embeddings
    rows, ranks = parse_batch(batch), shared.parse_count(devices, "--devices")
    spec = hardware_from_option(hardware, margin)
    memory = plan_memory(config, name, spec, tokens, rows, devices=ranks, dtype=dtype,
                         kv_dtype=kv_dtype, prefill_chunk=prefill_chunk, decode_mode=decode_mode,
                         allreduce_tile_tokens=allreduce_tile_tokens,
                         allow_ctx_extension=allow_ctx_extension)
    if memory.refusal:
        print(f"facli: warning: generate and summarize would stop here: {memory.refusal}",
              file=sys.stderr, flush=True)
    if json:
        print(memory.plan.to_json())
    else:
        print(describe(memory))
