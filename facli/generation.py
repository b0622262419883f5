"""Generation of one prompt, the work behind `facli generate`: tokenize, plan (refusing what
will not fit), then load and run on one process or N tensor-parallel ranks, rank 0 streaming
the text as it is produced.

    result = plan_and_generate(RunOptions(device="cpu"), "Hello", SamplingParams(), 32,
                               stream=False)
"""

import dataclasses
import sys

from facli.errors import FacliError
from facli.models.resolve import (
    check_context,
    check_prompt_fits,
    generation_ctx,
    resolve_device,
    resolve_model,
    tokenizer_for,
)
from facli.models.tokenizer import chat_prompt_ids
from facli.parallel.degrees import check_tensor_parallel
from facli.parallel.launch import launch, prints_here
from facli.planner.search import predict_prompt
from facli.run.placement import hardware_for, plan_run
from facli.run.runtime import Runtime
from facli.run.sampling import SamplingParams
from facli.run_options import RunOptions
from facli.units import format_ctx, format_seconds

LONG_PROMPT_TOKENS = 4096  # prompts from this length on show a prefill progress bar


def plan_and_generate(options: RunOptions, text: str, sampling: SamplingParams,
                      max_new_tokens: int, *, stream: bool,
                      chat: bool = False, system: str | None = None,
                      stop: tuple[str, ...] = (), auto_devices: bool = False) -> dict:
    """Tokenize (under the chat template with `chat`), plan (refusing what will not fit), then
    run on one process or N ranks. options.ctx None: the prompt and max_new_tokens.
    auto_devices: the plan's degree replaces options.devices (`--devices auto`)."""
    resolved = resolve_model(options.model)
    tokenizer = tokenizer_for(resolved)
    prompt_ids = chat_prompt_ids(tokenizer, text, system) if chat else tokenizer(text).input_ids
    if not options.ctx:
        ctx = generation_ctx(resolved.config, len(prompt_ids), max_new_tokens,
                             options.allow_ctx_extension)
        options = dataclasses.replace(options, ctx=ctx)
    check_prompt_fits(len(prompt_ids), options.ctx)
    check_context(resolved.config, options.ctx, options.allow_ctx_extension)
    if not auto_devices:
        check_tensor_parallel(resolved.config, options.devices)
    device = resolve_device(options.device)
    hardware = hardware_for(device, options.hardware)
    plan = plan_run(resolved.config, resolved.name, hardware, options, ctx=options.ctx,
                    world_size=None if auto_devices else options.devices)
    if auto_devices:
        options = dataclasses.replace(options, devices=plan.tp)
    prompt_prediction = predict_prompt(resolved.config, hardware, plan, len(prompt_ids),
                                       choose_mode=options.decode_mode == "auto")
    if prints_here():
        print(f"facli: {plan.summary_line()}", file=sys.stderr)
        for line in plan.hints:
            print(f"facli: {line}", file=sys.stderr)
        if not chat and getattr(tokenizer, "chat_template", None):
            print("facli: hint: this model has a chat template; --chat sends the prompt through "
                  "it as a user message", file=sys.stderr)
        if not plan.fits:
            print("facli: warning: --force: running a plan that does not fit", file=sys.stderr)
        prompt_line = _prompt_line(plan, len(prompt_ids), prompt_prediction)
        if prompt_line:
            print(f"facli: {prompt_line}", file=sys.stderr)
    if not prompt_ids:
        raise FacliError("expected a non-empty prompt, got 0 tokens; give --prompt or --prompt-file")
    request = GenerateRequest(options, resolved, prompt_ids, sampling, max_new_tokens, stream,
                              hardware, tokenizer, plan, prompt_prediction, stop)
    return launch(generate_on_rank, (request,), world_size=options.devices, device_type=device.type)


def _prompt_line(plan, prompt_tokens: int, prediction) -> str | None:
    """A line with the predictions for this prompt where they differ much from the plan's, which
    are for a prompt that fills the context (a short prompt in a cache sized for 256K)."""
    if (prediction.ttft_s is None or plan.timing.ttft_s < 1.0
            or prediction.ttft_s > 0.5 * plan.timing.ttft_s):
        return None
    mode = ""
    if prediction.packed:
        mode = " (the host layers' rows all fit on the GPU for it)"
    elif plan.host.layers and prediction.decode_mode != plan.decode_mode:
        mode = f" ({prediction.decode_mode} decode of host layers for it)"
    return (f"this prompt ({prompt_tokens} tokens): first token ~{format_seconds(prediction.ttft_s)}, "
            f"decode ~{prediction.decode_tokens_per_s:.1f} tok/s{mode}; the plan's figures are for "
            f"a prompt filling ctx {format_ctx(plan.ctx)}")


@dataclasses.dataclass(frozen=True)
class GenerateRequest:
    """Everything a rank needs; picklable, so that spawned ranks receive it."""

    options: RunOptions
    resolved: object
    prompt_ids: list
    sampling: object
    max_new_tokens: int
    stream: bool
    hardware: object
    tokenizer: object
    plan: object
    prompt_prediction: object  # planner.search.PromptPrediction for this prompt
    stop: tuple = ()  # strings that end generation before them


def generate_on_rank(parallel, request: GenerateRequest) -> dict:
    """Load this rank's shard, prefill and decode; rank 0 streams the text."""
    runtime = Runtime(request.resolved, request.options, parallel, tokenizer=request.tokenizer,
                      plan=request.plan, hardware=request.hardware)
    writer = parallel.is_writer

    def on_text(piece: str) -> None:
        if request.stream and writer:
            sys.stdout.write(piece)
            sys.stdout.flush()

    prompt_tokens = len(request.prompt_ids)
    with _prefill_bar(prompt_tokens, enabled=writer and prompt_tokens >= LONG_PROMPT_TOKENS) as bar:
        result = runtime.generate(request.prompt_ids, max_new_tokens=request.max_new_tokens,
                                  sampling=request.sampling, on_text=on_text,
                                  on_progress=bar.update if bar else None, stop=request.stop,
                                  prediction=request.prompt_prediction)
    plan = runtime.plan
    prompt = request.prompt_prediction
    return {
        "text": result.text,
        "token_ids": result.token_ids,
        "prompt_tokens": result.prompt_tokens,
        "ttft_s": result.ttft_s,
        "decode_tokens_per_s": result.decode_tokens_per_s,
        "peak_gpu_bytes": result.peak_gpu_bytes,
        "finish_reason": result.finish_reason,
        "devices": parallel.world_size,
        "plan": {"peak_gpu_bytes": plan.devices[parallel.rank].peak_bytes if plan.device_kind == "cuda" else None,
                 "ttft_s": plan.timing.ttft_s, "decode_tokens_per_s": plan.timing.decode_tokens_per_s,
                 "decode_mode": plan.decode_mode, "host_layers": list(plan.host.layers),
                 "host_cpu_share": plan.host_cpu_share, "prefill_chunk": plan.prefill_chunk,
                 "allreduce_tile_tokens": plan.allreduce_tile_tokens,
                 "prompt_ttft_s": prompt.ttft_s,
                 "prompt_decode_tokens_per_s": prompt.decode_tokens_per_s,
                 "prompt_decode_mode": prompt.decode_mode, "prompt_cpu_share": prompt.cpu_share},
    }


class _NoBar:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _prefill_bar(total: int, *, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc="prefill", unit="tok", unit_scale=True, file=sys.stderr, leave=False)
