"""Perplexity of a text by sliding windows, through the same chunked prefill and KV store that
generation runs on (so the KV dtype, the offload and the chunking are all part of the figure).

Windows follow transformers' perplexity guide ("Perplexity of fixed-length models") and
llama.cpp's perplexity tool: a window of `ctx` tokens moves by `stride`; each window scores only
the tokens past the previous window's end, each predicted from the window's tokens before it.
With stride == ctx the windows do not overlap; a smaller stride gives every scored token more
context, at more compute.
"""

import dataclasses
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from facli.errors import FacliError
from facli.models.resolve import check_context, resolve_device, resolve_model, tokenizer_for
from facli.parallel.degrees import check_tensor_parallel
from facli.parallel.launch import launch
from facli.run.placement import hardware_for, plan_run
from facli.run.runtime import Runtime
from facli.run_options import RunOptions


@dataclass(frozen=True)
class Window:
    """Tokens [begin, end) run through the model; those in [score_from, end) are scored."""

    begin: int
    end: int
    score_from: int


@dataclass(frozen=True)
class PerplexityResult:
    tokens: int  # tokens of the text
    scored: int  # tokens whose log-probability was summed
    nll_sum: float  # natural log
    windows: int
    seconds: float
    processed: int  # tokens run through the model, overlaps counted again

    @property
    def mean_nll(self) -> float:
        return self.nll_sum / self.scored

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean_nll)

    @property
    def tokens_per_s(self) -> float:
        """Tokens run through the model per second (windows overlap when stride < ctx)."""
        return self.processed / self.seconds if self.seconds > 0 else float("nan")

    def as_dict(self) -> dict:
        return {"perplexity": self.perplexity, "mean_nll": self.mean_nll, "tokens": self.tokens,
                "scored_tokens": self.scored, "windows": self.windows,
                "processed_tokens": self.processed, "seconds": self.seconds,
                "tokens_per_s": self.tokens_per_s}


def sliding_windows(total: int, ctx: int, stride: int) -> list[Window]:
    """The windows over a text of `total` tokens. No token is scored twice, and a window's first
    token is never scored (nothing in the window comes before it): with stride < ctx that is only
    the text's first token, with stride == ctx every window's first."""
    if total < 2 or not 0 < stride <= ctx:
        raise ValueError(f"expected 2 or more tokens and 0 < stride <= ctx, got {total}, {stride}, {ctx}")
    windows, scored_to = [], 1
    begin = 0
    while True:
        end = min(begin + ctx, total)
        windows.append(Window(begin, end, max(scored_to, begin + 1)))
        scored_to = end
        if end == total:
            return windows
        begin += stride


def window_nll(model, kv, ids: torch.Tensor, window: Window, chunk: int,
               on_progress=None) -> tuple[float, int]:
    """Sum of -log p(token) over the window's scored tokens, and their count. The window runs
    through `kv` (reset first) in chunks of `chunk` tokens; each chunk's logits are reduced to
    log-probabilities of its next tokens at once, so memory stays at one chunk's logits."""
    kv.reset()
    tokens = ids[:, window.begin:window.end]
    length = tokens.shape[1]
    total, count = 0.0, 0
    for start in range(0, length, chunk):
        stop = min(start + chunk, length)
        logits = model(tokens[:, start:stop], start, kv, all_logits=True)[0]
        # Position p predicts token p + 1; keep the predictions of scored tokens.
        first = max(start, window.score_from - window.begin - 1)
        last = min(stop, length - 1)
        if first < last:
            rows = logits[first - start:last - start].float()
            targets = tokens[0, first + 1:last + 1].to(rows.device)
            log_probs = torch.log_softmax(rows, dim=-1)
            total -= log_probs.gather(1, targets[:, None]).sum().item()
            count += last - first
        if on_progress is not None:
            on_progress(stop - start)
    return total, count


def perplexity(model, kv, ids: list[int], *, ctx: int, stride: int, chunk: int,
               on_progress=None) -> PerplexityResult:
    """Perplexity of the token ids under `model`, windows of `ctx` tokens every `stride`."""
    tensor = torch.tensor([ids], dtype=torch.long, device=model.device)
    windows = sliding_windows(len(ids), ctx, stride)
    started = time.perf_counter()
    nll, scored = 0.0, 0
    for window in windows:
        part, count = window_nll(model, kv, tensor, window, chunk, on_progress)
        nll, scored = nll + part, scored + count
    seconds = time.perf_counter() - started
    processed = sum(w.end - w.begin for w in windows)
    return PerplexityResult(tokens=len(ids), scored=scored, nll_sum=nll, windows=len(windows),
                            seconds=seconds, processed=processed)


@dataclass(frozen=True)
class PerplexityRequest:
    """Everything a rank needs; picklable, so that spawned ranks receive it."""

    options: RunOptions  # ctx: the window length
    resolved: object
    ids: list
    stride: int
    hardware: object
    tokenizer: object
    plan: object


def run_perplexity(text: str, source: Path, options: RunOptions, *, stride: int | None,
                   default_window: int) -> dict:
    """`facli perplexity`: tokenize `text` (read from `source`), choose the window (options.ctx
    None: the model's max_position_embeddings, at most `default_window`, and at most the text)
    and stride (None: half the window), plan, then score on options.devices ranks; the result of
    rank 0 (perplexity_on_rank)."""
    resolved = resolve_model(options.model)
    tokenizer = tokenizer_for(resolved)
    ids = tokenizer(text).input_ids
    if len(ids) < 2:
        raise FacliError(f"expected a text of at least 2 tokens in {source}, got {len(ids)}")
    limit = resolved.config.max_position_embeddings
    asked = options.ctx if options.ctx is not None else min(limit, default_window)
    window = min(asked, len(ids))  # a text shorter than the window is one window
    step = stride if stride is not None else max(1, window // 2)
    if asked > window:
        step = min(step, window)
    if not 1 <= step <= window:
        raise FacliError(f"expected --stride from 1 to the window ({window} tokens), got {step}")
    check_context(resolved.config, window, options.allow_ctx_extension)
    check_tensor_parallel(resolved.config, options.devices)
    run_device = resolve_device(options.device)
    hardware = hardware_for(run_device, None)
    options = dataclasses.replace(options, ctx=window)
    plan = plan_run(resolved.config, resolved.name, hardware, options, ctx=window,
                    world_size=options.devices)
    print(f"facli: {plan.summary_line()}", file=sys.stderr)
    print(f"facli: {len(ids)} tokens, windows of {window} every {step}", file=sys.stderr)
    request = PerplexityRequest(options, resolved, ids, step, hardware, tokenizer, plan)
    return launch(perplexity_on_rank, (request,), world_size=options.devices,
                  device_type=run_device.type)


def perplexity_on_rank(parallel, request: PerplexityRequest) -> dict:
    """Load this rank's shard and score the text; rank 0 shows progress."""
    runtime = Runtime(request.resolved, request.options, parallel, tokenizer=request.tokenizer,
                      plan=request.plan, hardware=request.hardware)
    windows = sliding_windows(len(request.ids), request.options.ctx, request.stride)
    processed = sum(w.end - w.begin for w in windows)
    with _progress(processed, enabled=parallel.is_writer) as bar:
        result = perplexity(runtime.model, runtime.engine.kv, request.ids, ctx=request.options.ctx,
                            stride=request.stride, chunk=runtime.prefill_chunk,
                            on_progress=bar.update)
    plan = runtime.plan
    return {**result.as_dict(), "ctx": request.options.ctx, "stride": request.stride,
            "kv_dtype": plan.kv_dtype, "weight_dtype": plan.weight_dtype,
            "host_layers": len(plan.host.layers), "devices": parallel.world_size,
            "prefill_chunk": runtime.prefill_chunk, "model": request.resolved.name}


def _progress(total: int, *, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc="perplexity", unit="tok", unit_scale=True, disable=not enabled,
                file=sys.stderr, dynamic_ncols=True)
