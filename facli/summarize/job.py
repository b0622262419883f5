"""The per-document loop: summarize, record, show progress, stop cleanly when asked.

`run_documents` is a plain function of (runtime, documents, writer) so that every tensor-parallel
rank can run it in step; only the writer rank (rank 0) writes records and shows progress.
"""

import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

from tqdm import tqdm

from facli.errors import FacliError
from facli.summarize import strategies
from facli.summarize.batched import run_batched
from facli.summarize.faults import OomGuard
from facli.summarize.interrupt import StopRequest
from facli.summarize.output import ResultWriter, make_record
from facli.summarize.planning import PreparedDocument
from facli.summarize.prompting import Prompts
from facli.summarize.strategies import Budget, DocumentFailed, Outcome, Strategy


@dataclass(frozen=True)
class JobSettings:
    strategy: Strategy
    budget: Budget
    prompts: Prompts
    sampling: object  # facli.sampling.SamplingParams


@dataclass
class JobSummary:
    done: int = 0
    failed: int = 0
    skipped: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    seconds: float = 0.0
    generation_s: float = 0.0  # in the document loop: the model loaded, documents running
    interrupted: bool = False

    def add(self, record: dict) -> None:
        if record["status"] == "ok":
            self.done += 1
        else:
            self.failed += 1
        self.prompt_tokens += record["prompt_tokens"]
        self.generated_tokens += record["generated_tokens"]

    def merge(self, other: "JobSummary") -> None:
        """Add the counts and seconds of a later part of the same run."""
        for name in ("done", "failed", "skipped", "prompt_tokens", "generated_tokens",
                     "seconds", "generation_s"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.interrupted = self.interrupted or other.interrupted

    def as_dict(self) -> dict:
        return {**asdict(self), "seconds": round(self.seconds, 3),
                "generation_s": round(self.generation_s, 3)}

    def line(self) -> str:
        stopped = "; interrupted, rerun the same command to resume" if self.interrupted else ""
        return (
            f"facli: summarize: {self.done} done, {self.failed} failed, {self.skipped} skipped; "
            f"{self.prompt_tokens} prompt + {self.generated_tokens} generated tokens in "
            f"{self.seconds:.1f} s{stopped}"
        )


def run_documents(runtime, items: Sequence[PreparedDocument], writer: ResultWriter | None,
                  settings: JobSettings, *, stop: StopRequest | None = None,
                  is_writer: bool = True, agree: Callable[[bool], bool] | None = None,
                  label: str = "summarize") -> JobSummary:
    """Summarize `items`, appending one record per document as it finishes.

    With a runtime of several rows (runtime.rows) documents run side by side and their records
    come in the order they finish; otherwise one after another. A first Ctrl-C (see
    StopRequest) starts no new document and ends the loop once those in progress are recorded;
    a second abandons them. Either way the summary comes back with `interrupted` set and
    nothing half-written. `agree(requested) -> bool` (a collective, with several ranks) makes
    every rank stop together.
    """
    assert writer is not None or not is_writer, "the writer rank needs a ResultWriter"
    stop = stop or StopRequest()
    summary = JobSummary()
    bar = tqdm(total=len(items), unit="doc", desc=label, file=sys.stderr,
               disable=not is_writer, dynamic_ncols=True)
    started = time.perf_counter()

    def record(entry: dict) -> None:
        with stop.deferred():
            if is_writer:
                writer.append(entry)
            summary.add(entry)
        _advance(bar, summary, time.perf_counter() - started)

    def stop_agreed() -> bool:
        summary.interrupted = agree(stop.requested) if agree else stop.requested
        return summary.interrupted

    try:
        remaining = list(items)
        if getattr(runtime, "rows", 1) > 1:
            remaining = run_batched(
                runtime, remaining, settings,
                on_outcome=lambda item, outcome, since: record(document_record(item, outcome, since)),
                may_start=lambda: not stop_agreed(), log=bar.write if is_writer else None)
        generate = OomGuard(runtime, max_new_tokens=settings.budget.max_new_tokens,
                            sampling=settings.sampling, log=is_writer)
        for item in remaining:
            if summary.interrupted:
                break
            record(summarize_document(item, settings, generate))
            stop_agreed()
    except KeyboardInterrupt:
        summary.interrupted = True
        if is_writer:
            bar.write("facli: abandoned the documents in progress", file=sys.stderr)
    finally:
        bar.close()
        summary.generation_s = time.perf_counter() - started
    return summary


def summarize_document(item: PreparedDocument, settings: JobSettings, generate) -> dict:
    """One record for one document; failures of this document are recorded, not raised."""
    started = time.perf_counter()
    if item.ids is None:
        return document_record(item, Outcome(None, 0, 0, item.document.error), started)
    try:
        outcome = strategies.summarize(settings.strategy, list(item.ids), settings.prompts,
                                       settings.budget, generate)
    except (DocumentFailed, FacliError) as exc:
        outcome = strategies.failure(item.ids, settings.prompts, exc)
    return document_record(item, outcome, started)


def document_record(item: PreparedDocument, outcome: Outcome, started: float) -> dict:
    doc = item.document
    return make_record(
        doc.id, doc.source, summary=outcome.summary, prompt_tokens=outcome.prompt_tokens,
        generated_tokens=outcome.generated_tokens, seconds=time.perf_counter() - started,
        error=outcome.error,
    )


def _advance(bar: tqdm, summary: JobSummary, elapsed: float) -> None:
    rate = summary.generated_tokens / elapsed if elapsed > 0 else 0.0
    bar.set_postfix_str(f"{rate:.1f} tok/s, {summary.failed} failed", refresh=False)
    bar.update(1)
