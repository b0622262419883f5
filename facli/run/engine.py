"""The inference loop: chunked prefill into a preallocated KV cache, then token-by-token decode."""

import time
from dataclasses import dataclass, field

import torch

from facli.models.llama import CausalLM
from facli.offload.store import KVStore
from facli.run.graphs import GraphedDecodeStep
from facli.run.sampling import Sampler, TokenHistory


@dataclass
class Timings:
    ttft_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0

    @property
    def decode_tokens_per_s(self) -> float | None:
        """Timed from the end of the first decode step: None (not measured) when fewer than two
        decode steps ran."""
        measured = self.decode_steps > 0 and self.decode_s > 0
        return self.decode_steps / self.decode_s if measured else None


@dataclass
class TokenRun:
    """Generated ids for each sequence and why generation stopped."""

    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = "length"
    timings: Timings = field(default_factory=Timings)


def prefill(model: CausalLM, kv: KVStore, ids: torch.Tensor, chunk: int,
            on_progress=None) -> torch.Tensor:
    """ids [B, T] -> logits [B, V] of the last position, with `kv` reset and then holding the T
    positions. Activation memory is bounded by the chunk size, not the prompt length."""
    kv.reset()
    length = ids.shape[1]
    if length > kv.capacity:
        raise ValueError(f"prompt of {length} tokens exceeds cache capacity {kv.capacity}")
    logits = None
    for start in range(0, length, chunk):
        stop = min(start + chunk, length)
        logits = model(ids[:, start:stop], start, kv)
        if on_progress is not None:
            on_progress(stop - start)
    return logits


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Engine:
    """Runs a CausalLM over a KVStore, one prompt at a time; shapes keep the batch axis, and
    decode_step steps every sequence of the store (facli.run.batching runs prompts in rows)."""

    def __init__(self, model: CausalLM, kv: KVStore, *, prefill_chunk: int,
                 token_sync=None, use_graphs: bool = True):
        self.model, self.kv, self.prefill_chunk = model, kv, prefill_chunk
        graphed = use_graphs and GraphedDecodeStep.supported(model, kv)
        self._graphed_step = GraphedDecodeStep(model, kv) if graphed else None
        self.device = model.device
        # Decode steps queued ahead of the host's reads: on a GPU the next step runs while the
        # host reads a token; on the CPU a step runs as it is called, so queuing gains nothing.
        self.lookahead = 1 if self.device.type == "cuda" else 0
        # Called on each sampled token tensor; tensor parallelism makes all ranks agree here.
        self.token_sync = token_sync or (lambda tokens: tokens)

    def prefill(self, ids: torch.Tensor, on_progress=None) -> torch.Tensor:
        """ids [B, T] -> logits [B, V] of the last position; the cache then holds T positions."""
        return prefill(self.model, self.kv, ids, self.prefill_chunk, on_progress)

    def decode_step(self, tokens: torch.Tensor, position) -> torch.Tensor:
        """tokens [B] at `position` (an int, or a [B] device tensor: one per sequence) -> logits
        [B, V] for the next one."""
        if self._graphed_step is not None and tokens.shape[0] == self._graphed_step.batch:
            return self._graphed_step(tokens, position)
        return self.model(tokens[:, None], position, self.kv)

    def generate(self, prompt_ids: list[int], *, max_new_tokens: int, sampler: Sampler,
                 eos_ids: tuple[int, ...] = (), on_token=None, on_progress=None) -> TokenRun:
        """Prefill `prompt_ids`, then sample until EOS, max_new_tokens, or a full cache, or until
        on_token(token id) returns True (finish reason "stop"). The sampler's repetition controls
        read the prompt and every token generated."""
        run = TokenRun()
        ids = torch.tensor([prompt_ids], dtype=torch.long, device=self.device)
        budget = min(max_new_tokens, self.kv.capacity - len(prompt_ids) + 1)
        if budget <= 0:
            return run
        started = time.perf_counter()
        history = TokenHistory(sampler.params, 1, self.model.config.vocab_size, self.device)
        history.start(0, prompt_ids)
        logits = self.prefill(ids, on_progress)
        token = self.token_sync(sampler(history.apply(logits)))
        history.push(token)
        first = int(token[0])
        run.timings.ttft_s = time.perf_counter() - started
        run.token_ids.append(first)
        if on_token is not None and on_token(first):
            run.finish_reason = "stop"
            return run
        if first in eos_ids:
            run.finish_reason = "eos"
            return run
        # The first decode step may capture a CUDA graph and compile kernels: the steady-state
        # rate is timed from the end of that step.
        decode_started, timed_from = None, 0
        steps = self._decode(token, len(prompt_ids), budget - 1, sampler, history)
        for value in steps:
            run.token_ids.append(value)
            if decode_started is None:
                decode_started, timed_from = time.perf_counter(), len(run.token_ids)
            if on_token is not None and on_token(value):
                run.finish_reason = "stop"
                break
            if value in eos_ids:
                run.finish_reason = "eos"
                break
        steps.close()
        if decode_started is not None:
            _sync(self.device)
            run.timings.decode_s = time.perf_counter() - decode_started
            run.timings.decode_steps = len(run.token_ids) - timed_from
        return run

    def _decode(self, token: torch.Tensor, position: int, steps: int, sampler: Sampler,
                history: TokenHistory):
        """Yields the host ids of up to `steps` tokens decoded after `token` (device [1]) at
        `position`. The `lookahead` steps after a token are queued before the host reads it, so
        the GPU never idles while the host reads, checks and launches. A caller that stops early
        leaves those steps unread: they wrote only at positions the cache holds. The n-gram ban
        needs each token on the host before the next step's logits, so it queues none ahead."""
        ahead = 0 if history.ngram else self.lookahead
        reads = HostReads(self.device, slots=ahead + 1)
        for step in range(steps):
            logits = self.decode_step(token, position + step)
            token = self.token_sync(sampler(history.apply(logits)))
            history.push(token)
            reads.push(token)
            if reads.in_flight > ahead:
                yield reads.pop()
        while reads.in_flight:
            yield reads.pop()


class HostReads:
    """Device token ids copied to the host without stopping the stream: each push starts a
    copy into its own pinned slot, and a pop waits only for the oldest copy, not for work queued
    after it."""

    def __init__(self, device: torch.device, slots: int, width: int = 1):
        self.gpu = device.type == "cuda"
        self.slots = [torch.empty(width, dtype=torch.long, pin_memory=self.gpu) for _ in range(slots)]
        self.events = [torch.cuda.Event() if self.gpu else None for _ in range(slots)]
        self.pushed = self.popped = 0

    @property
    def in_flight(self) -> int:
        """Reads pushed and not yet popped."""
        return self.pushed - self.popped

    def push(self, tokens: torch.Tensor) -> None:
        """Start reading tokens' first `width` ids; at most len(slots) reads are in flight."""
        assert self.in_flight < len(self.slots), "every slot holds an unread token"
        slot = self.pushed % len(self.slots)
        width = self.slots[slot].shape[0]
        self.slots[slot].copy_(tokens.reshape(-1)[:width], non_blocking=self.gpu)
        if self.gpu:
            self.events[slot].record()
        self.pushed += 1

    def pop_all(self) -> list[int]:
        """The oldest pushed ids, once their copy is done."""
        slot = self.popped % len(self.slots)
        if self.gpu:
            self.events[slot].synchronize()
        self.popped += 1
        return self.slots[slot].tolist()

    def pop(self) -> int:
        """The oldest pushed first id, once its copy is done."""
        return self.pop_all()[0]
