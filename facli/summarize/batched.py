"""Documents summarized side by side: their prompts share the rows of one batch.

Each document runs its strategy's steps (facli.summarize.strategies): the prompts of a round go
into the queue, free rows of the runtime take prompts from it, and when a document's round is
complete its steps get the results and hand out the next round or the outcome. A new document
starts only when the queue is empty, so documents in progress finish first.
"""

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from facli.errors import FacliError
from facli.models.resolve import check_prompt_fits
from facli.run.batching import BatchStats, RowRequest
from facli.summarize import strategies
from facli.summarize.faults import free_memory, is_out_of_memory
from facli.summarize.planning import PreparedDocument
from facli.summarize.strategies import DocumentFailed, Outcome


@dataclass
class _InProgress:
    item: PreparedDocument
    steps: strategies.Steps
    started: float
    results: list = field(default_factory=list)
    missing: int = 0


def run_batched(runtime, items: list[PreparedDocument], settings, *,
                on_outcome: Callable[[PreparedDocument, Outcome, float], None],
                may_start: Callable[[], bool], log: Callable[[str], None] | None = None,
                on_progress: Callable[[int, int], None] | None = None,
                ) -> tuple[list[PreparedDocument], BatchStats | None]:
    """Summarize `items` in the runtime's rows; on_outcome(item, outcome, started) as each
    document ends; may_start() before each new document (False: start no more);
    on_progress(prefilled, decoded) as each prefill chunk and decode step runs. Returns the
    documents left to run one at a time and the rows' BatchStats: no documents, unless the
    rows ran out of memory (then no stats), after which the runtime has one row and the
    documents in progress start again."""
    documents = _DocumentQueue(items, settings, runtime.ctx, on_outcome, may_start)
    try:
        stats = runtime.generate_rows(documents.next_request, documents.on_done,
                                      sampling=settings.sampling, on_progress=on_progress)
    except Exception as exc:  # noqa: BLE001 - only out-of-memory is handled, the rest re-raised
        if not is_out_of_memory(exc):
            raise
        rows = runtime.rows
        free_memory()
        runtime.reshape(rows=1)
        if log is not None:
            log(f"facli: out of memory with {rows} documents at once; going on one at a time")
        return documents.unfinished(), None
    if log is not None and stats.decode_steps:
        rate = stats.decode_tokens_per_s  # None: fewer than two decode steps ran
        rate = "decode rate not measured" if rate is None else f"{rate:.0f} tokens/s in decode"
        log(f"facli: {runtime.rows} rows: {stats.prompts} prompts, {stats.prefill_s:.1f} s of "
            f"prefill, {stats.decode_steps} decode steps with "
            f"{stats.decode_tokens / stats.decode_steps:.1f} rows busy on average, {rate}")
    return [], stats


class _DocumentQueue:
    """The prompts of the documents in progress, handed to rows as they free up."""

    def __init__(self, items, settings, ctx: int, on_outcome, may_start):
        self.settings, self.ctx = settings, ctx
        self.on_outcome, self.may_start = on_outcome, may_start
        self.upcoming = deque(items)
        self.prompts: deque[RowRequest] = deque()
        self.in_progress: dict[str, _InProgress] = {}

    def next_request(self) -> RowRequest | None:
        """The next prompt of a document in progress, else the first of a new document."""
        while not self.prompts:
            if not self.upcoming or not self.may_start():
                return None
            self._start(self.upcoming.popleft())
        return self.prompts.popleft()

    def on_done(self, request: RowRequest, result) -> None:
        doc, index = request.key
        doc.results[index] = result
        doc.missing -= 1
        if doc.missing == 0:
            self._advance(doc, doc.results)

    def unfinished(self) -> list[PreparedDocument]:
        return [doc.item for doc in self.in_progress.values()] + list(self.upcoming)

    def _start(self, item: PreparedDocument) -> None:
        started = time.perf_counter()
        if item.ids is None:
            self.on_outcome(item, Outcome(None, 0, 0, item.document.error), started)
            return
        settings = self.settings
        steps = strategies.steps(settings.strategy, list(item.ids), settings.prompts, settings.budget)
        doc = self.in_progress[item.document.id] = _InProgress(item, steps, started)
        self._advance(doc, None)

    def _advance(self, doc: _InProgress, results) -> None:
        """Send the document its round's results; queue its next round, or record it."""
        try:
            prompts = next(doc.steps) if results is None else doc.steps.send(results)
            for prompt in prompts:  # as `generate` would refuse it, for this document alone
                check_prompt_fits(len(prompt), self.ctx)
        except StopIteration as finished:
            return self._finish(doc, finished.value)
        except (DocumentFailed, FacliError) as exc:
            return self._finish(doc, strategies.failure(doc.item.ids, self.settings.prompts, exc))
        doc.results, doc.missing = [None] * len(prompts), len(prompts)
        new_tokens = self.settings.budget.max_new_tokens
        self.prompts.extend(RowRequest(list(prompt), new_tokens, key=(doc, index))
                            for index, prompt in enumerate(prompts))

    def _finish(self, doc: _InProgress, outcome: Outcome) -> None:
        del self.in_progress[doc.item.document.id]
        self.on_outcome(doc.item, outcome, doc.started)
