"""Continuous batching: many prompts decoded together, each in its own row of one KV cache.

At batch 1 a decode step reads every weight once for one token. With B rows the same weight
traffic makes B tokens, so a job of many prompts (summarize) runs several times faster. Rows are
independent: each holds its own prompt at its own length, and a row whose generation ends takes
the next prompt (prefilled into that row alone) while the others wait, then rejoin the steps.
"""

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from facli.models.llama import CausalLM
from facli.offload.device_cache import DeviceKVCache
from facli.run.engine import Engine, HostReads, TokenRun, prefill
from facli.run.sampling import Sampler, SamplingParams, TokenHistory


@dataclass
class RowRequest:
    """One prompt to run; `key` is the caller's, handed back with its result."""

    prompt_ids: list[int]
    max_new_tokens: int
    key: object = None


@dataclass
class BatchStats:
    prompts: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0
    decode_tokens: int = 0  # over all rows: steps x rows busy in each

    @property
    def decode_tokens_per_s(self) -> float | None:
        """None (not measured) when fewer than two decode steps ran."""
        measured = self.decode_steps >= 2 and self.decode_s > 0
        return self.decode_tokens / self.decode_s if measured else None


@dataclass
class _Row:
    request: RowRequest
    sampler: Sampler
    budget: int
    position: int  # of the row's next decode step
    run: TokenRun = field(default_factory=TokenRun)
    queued: int = 0  # its decode steps queued and not yet read
    done: bool = False

    @property
    def steps_left(self) -> bool:
        return len(self.run.token_ids) + self.queued < self.budget


class BatchedEngine:
    """Runs prompts in the rows of a DeviceKVCache of batch B, B at a time."""

    def __init__(self, model: CausalLM, kv: DeviceKVCache, *, prefill_chunk: int,
                 token_sync=None, use_graphs: bool = True):
        self.model, self.kv, self.prefill_chunk = model, kv, prefill_chunk
        self.rows = kv.batch
        self.device = model.device
        self.engine = Engine(model, kv, prefill_chunk=prefill_chunk, use_graphs=use_graphs)
        # Called on each step's sampled tokens; tensor parallelism makes all ranks agree here.
        self.token_sync = token_sync or (lambda tokens: tokens)
        self._row_caches = [kv.row(index) for index in range(self.rows)]
        self._history: TokenHistory | None = None

    def run(self, next_request: Callable[[], RowRequest | None],
            on_done: Callable[[RowRequest, TokenRun], None], *, sampling: SamplingParams,
            eos_ids: tuple[int, ...] = (),
            on_progress: Callable[[int, int], None] | None = None) -> BatchStats:
        """Take requests from next_request() (None: no more for now) into free rows until it has
        none and every row is done; on_done(request, run) as each one ends (EOS, its token
        budget, or a full row). next_request is asked again whenever a row is free, so it may
        hand out prompts that depend on earlier results. on_progress(prefilled, decoded) after
        each prefill chunk (its tokens, 0) and each decode step (0, its busy rows).

        As Engine.generate does, the engine's `lookahead` steps are queued before the host reads
        a step's tokens. A row that ends at EOS has had those steps run too: they wrote at
        positions its cache holds, the next prompt in the row overwrites them, and their tokens
        are dropped. A row at its token budget is stepped no further."""
        progress = on_progress or (lambda prefilled, decoded: None)
        stats = BatchStats()
        # Each row's own tokens for the repetition controls, restarted as a prompt takes the row.
        self._history = TokenHistory(sampling, self.rows, self.model.config.vocab_size, self.device)
        ahead = 0 if self._history.ngram else self.engine.lookahead
        reads = HostReads(self.device, slots=ahead + 1, width=self.rows)
        rows: list[_Row | None] = [None] * self.rows
        queued: deque[list[_Row | None]] = deque()  # each queued step's rows, oldest first
        chosen = None  # the last queued step's tokens, on the device
        while True:
            self._fill(rows, next_request, on_done, sampling, eos_ids, stats, progress)
            started = time.perf_counter()
            stepping = [row if row is not None and row.steps_left else None for row in rows]
            if any(stepping):
                chosen = self._step(stepping, chosen)
                reads.push(chosen)
                queued.append(stepping)
            if not queued:
                return stats
            if len(queued) <= ahead and any(stepping):
                continue
            stepped, tokens = queued.popleft(), reads.pop_all()
            busy = [index for index, row in enumerate(stepped) if row is not None and not row.done]
            for index in busy:
                row = stepped[index]
                row.queued -= 1
                if self._accept(row, tokens[index], eos_ids):
                    row.done = True
                    self._history.stop(index)
                    on_done(row.request, row.run)
                    rows[index] = None
            stats.decode_steps += 1
            stats.decode_tokens += len(busy)
            stats.decode_s += time.perf_counter() - started
            progress(0, len(busy))

    def _fill(self, rows, next_request, on_done, sampling, eos_ids, stats: BatchStats,
              progress) -> None:
        """Prefill a request into each free row; one that ends at its first token frees the
        row again at once."""
        for index in range(self.rows):
            while rows[index] is None:
                request = next_request()
                if request is None:
                    return
                row, first = self._start(index, request, sampling, stats, progress)
                if first is not None and not self._accept(row, first, eos_ids):
                    rows[index] = row
                else:
                    self._history.stop(index)
                    on_done(request, row.run)

    def _start(self, index: int, request: RowRequest, sampling: SamplingParams,
               stats: BatchStats, progress) -> tuple[_Row, int | None]:
        """Prefill into row `index`: the row and its first token (None: no room to generate)."""
        cache = self._row_caches[index]
        length = len(request.prompt_ids)
        row = _Row(request, Sampler(sampling, self.device),
                   budget=min(request.max_new_tokens, cache.capacity - length + 1), position=length)
        stats.prompts += 1
        if row.budget <= 0:
            return row, None
        started = time.perf_counter()
        ids = torch.tensor([request.prompt_ids], dtype=torch.long, device=self.device)
        logits = prefill(self.model, cache, ids, self.prefill_chunk,
                         on_progress=lambda tokens: progress(tokens, 0))
        this_row = slice(index, index + 1)
        self._history.start(index, request.prompt_ids)
        token = self.token_sync(row.sampler(self._history.apply(logits, this_row)))
        self._history.push(token, this_row)
        first = int(token[0])
        row.run.timings.ttft_s = time.perf_counter() - started
        stats.prefill_s += row.run.timings.ttft_s
        return row, first

    @staticmethod
    def _accept(row: _Row, token: int, eos_ids) -> bool:
        """Append `token` to the row's run; whether the row is done."""
        row.run.token_ids.append(token)
        if token in eos_ids:
            row.run.finish_reason = "eos"
            return True
        return len(row.run.token_ids) >= row.budget

    def _step(self, rows: list[_Row | None], previous: torch.Tensor | None) -> torch.Tensor:
        """Queue one decode step of every row (a free row decodes a dummy token at position 0,
        which the next prompt in it overwrites); returns the sampled tokens [rows] on the device.
        A row with a step still unread takes its token from `previous`, that step's tokens."""
        last = [row.run.token_ids[-1] if row and not row.queued else 0 for row in rows]
        pending = [bool(row and row.queued) for row in rows]
        positions = [row.position if row else 0 for row in rows]
        host = torch.tensor([last, positions, pending], dtype=torch.long)
        if self.device.type == "cuda":  # from pinned memory the copy waits for no queued work
            host = host.pin_memory()
        tokens, positions, pending = host.to(self.device, non_blocking=True).unbind(0)
        if previous is not None and any(pending):
            tokens = torch.where(pending.bool(), previous, tokens)
        for row in rows:
            if row is not None:
                row.position += 1
                row.queued += 1
        logits = self._history.apply(self.engine.decode_step(tokens, positions))
        if all(row is None or row.sampler.params.greedy for row in rows):
            chosen = logits.argmax(dim=-1)
        else:  # each row from its own seeded generator, as when it runs alone
            chosen = torch.stack([row.sampler(logits[index:index + 1])[0] if row else
                                  torch.zeros((), dtype=torch.long, device=self.device)
                                  for index, row in enumerate(rows)])
        chosen = self.token_sync(chosen)
        self._history.push(chosen)  # free rows' tokens too: a row's next start resets them
        return chosen
