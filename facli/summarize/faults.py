"""Out-of-memory fallbacks for one document: a smaller prefill chunk, then the next decode mode.

Only when every step runs out of memory does the document fail (the batch goes on).
"""

import gc
from dataclasses import dataclass
from typing import Callable

import torch

from facli.models.resolve import check_prompt_fits
from facli.summarize.progress import Progress, PromptProgress
from facli.summarize.strategies import DocumentFailed

# Decode modes after "auto", each needing less GPU memory than the one before.
DECODE_MODE_FALLBACKS = ("prefetch", "cpu")
PREFILL_SHRINK_STEPS = 2  # halvings of the prefill chunk before changing the decode mode
MIN_PREFILL_CHUNK = 128


@dataclass(frozen=True)
class Attempt:
    prefill_chunk: int | None = None  # None: the runtime's own
    decode_mode: str | None = None  # None: leave it as it is

    def describe(self) -> str:
        parts = [f"prefill chunk {self.prefill_chunk}" if self.prefill_chunk else "",
                 f"decode mode {self.decode_mode}" if self.decode_mode else ""]
        return ", ".join(p for p in parts if p) or "the planned settings"


def is_out_of_memory(exc: BaseException) -> bool:
    kinds = tuple(kind for kind in (getattr(torch, "OutOfMemoryError", None),
                                    getattr(torch.cuda, "OutOfMemoryError", None)) if kind)
    return isinstance(exc, kinds)


def attempts(prefill_chunk: int, prompt_tokens: int, decode_mode: str = "auto") -> list[Attempt]:
    """The planned settings, then smaller prefill chunks, then each later decode mode."""
    chunk = min(prefill_chunk, max(prompt_tokens, 1))
    steps = [Attempt()]
    for _ in range(PREFILL_SHRINK_STEPS):
        if chunk // 2 < MIN_PREFILL_CHUNK:
            break
        chunk //= 2
        steps.append(Attempt(prefill_chunk=chunk))
    later = DECODE_MODE_FALLBACKS
    if decode_mode in DECODE_MODE_FALLBACKS:
        later = later[later.index(decode_mode) + 1:]
    steps.extend(Attempt(prefill_chunk=chunk, decode_mode=mode) for mode in later)
    return steps


class OomGuard:
    """Checks that a prompt fits the runtime's context, then runs `runtime.generate` through the
    attempts; restores the runtime's settings afterwards.
    log(message) says when an attempt ran out of memory (None: silent); `progress` counts each
    attempt's prefill chunks and decoded tokens."""

    def __init__(self, runtime, *, max_new_tokens: int, sampling,
                 log: Callable[[str], None] | None = None, progress: Progress | None = None):
        self.runtime = runtime
        self.max_new_tokens = max_new_tokens
        self.sampling = sampling
        self.log = log
        self.progress = progress

    def __call__(self, prompt_ids: list[int]):
        check_prompt_fits(len(prompt_ids), self.runtime.ctx)  # a user error: no fallback helps
        mode = getattr(getattr(self.runtime, "options", None), "decode_mode", "auto")
        planned_chunk = getattr(self.runtime, "prefill_chunk", None)
        retried = changed_mode = False
        try:
            for attempt in attempts(planned_chunk or len(prompt_ids), len(prompt_ids), mode):
                if attempt.decode_mode:
                    self.runtime.reconfigure(decode_mode=attempt.decode_mode)
                    changed_mode = True
                result = self._try(prompt_ids, attempt)
                if result is not None:
                    return result
                retried = True
        finally:
            if retried:
                self.runtime.reconfigure(decode_mode=mode if changed_mode else None,
                                         prefill_chunk=planned_chunk)
        raise DocumentFailed(
            f"out of memory with every fallback (last: {attempt.describe()}); lower --ctx, use "
            "--strategy map-reduce, or add --devices"
        )

    def _try(self, prompt_ids: list[int], attempt: Attempt):
        tracker = PromptProgress(self.progress) if self.progress is not None else None
        callbacks = dict(on_progress=tracker.on_progress, on_text=tracker.on_text) if tracker else {}
        try:
            result = self.runtime.generate(
                prompt_ids, max_new_tokens=self.max_new_tokens, sampling=self.sampling,
                prefill_chunk=attempt.prefill_chunk, **callbacks,
            )
        except Exception as exc:  # noqa: BLE001 - only out-of-memory is handled, the rest re-raised
            if not is_out_of_memory(exc):
                raise
        else:
            if tracker is not None:
                tracker.finish(result.token_ids)
            return result
        free_memory()
        if self.log is not None:
            self.log(f"facli: out of memory with {attempt.describe()}; retrying")
        return None


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
