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
    interrupted: bool = False

    def add(self, record: dict) -> None:
        if record["status"] == "ok":
            self.done += 1
        else:
            self.failed += 1
        self.prompt_tokens += record["prompt_tokens"]
        self.generated_tokens += record["generated_tokens"]

    def as_dict(self) -> dict:
        return {**asdict(self), "seconds": round(self.seconds, 3)}

    def line(self) -> str:
        stopped = "; interrupted, rerun the same command to resume" if self.interrupted else ""
        return (
            f"facli: summarize: {self.done} done, {self.failed} failed, {self.skipped} skipped; "
            f"{self.prompt_tokens} prompt + {self.generated_tokens} generated tokens in "
            f"{self.seconds:.1f} s{stopped}"
        )


def run_documents(runtime, items: Sequence[PreparedDocument], writer: ResultWriter | None,
                  settings: JobSettings, *, stop: StopRequest | None = None,
                  is_writer: bool = True, agree: Callable[[bool], bool] | None = None) -> JobSummary:
    """Summarize `items` in order, appending one record per document as it finishes.

    A first Ctrl-C (see StopRequest) ends the loop after the current document; a second abandons
    it. Either way the summary comes back with `interrupted` set and nothing half-written.
    `agree(requested) -> bool` (a collective, with several ranks) makes every rank stop together.
    """
    assert writer is not None or not is_writer, "the writer rank needs a ResultWriter"
    stop = stop or StopRequest()
    summary = JobSummary()
    generate = OomGuard(runtime, max_new_tokens=settings.budget.max_new_tokens,
                        sampling=settings.sampling, log=is_writer)
    bar = tqdm(total=len(items), unit="doc", desc="summarize", file=sys.stderr,
               disable=not is_writer, dynamic_ncols=True)
    started = time.perf_counter()
    try:
        for item in items:
            record = summarize_document(item, settings, generate)
            with stop.deferred():
                if is_writer:
                    writer.append(record)
                summary.add(record)
            _advance(bar, summary, time.perf_counter() - started)
            if agree(stop.requested) if agree else stop.requested:
                summary.interrupted = True
                break
    except KeyboardInterrupt:
        summary.interrupted = True
        if is_writer:
            bar.write("facli: abandoned the current document", file=sys.stderr)
    finally:
        bar.close()
    return summary


def summarize_document(item: PreparedDocument, settings: JobSettings, generate) -> dict:
    """One record for one document; failures of this document are recorded, not raised."""
    doc = item.document
    started = time.perf_counter()
    if item.ids is None:
        outcome = Outcome(None, 0, 0, doc.error)
    else:
        try:
            outcome = strategies.summarize(settings.strategy, list(item.ids), settings.prompts,
                                           settings.budget, generate)
        except (DocumentFailed, FacliError) as exc:
            outcome = Outcome(None, len(item.ids) + settings.prompts.summarize.overhead, 0, str(exc))
    return make_record(
        doc.id, doc.source, summary=outcome.summary, prompt_tokens=outcome.prompt_tokens,
        generated_tokens=outcome.generated_tokens, seconds=time.perf_counter() - started,
        error=outcome.error,
    )


def _advance(bar: tqdm, summary: JobSummary, elapsed: float) -> None:
    rate = summary.generated_tokens / elapsed if elapsed > 0 else 0.0
    bar.set_postfix_str(f"{rate:.1f} tok/s, {summary.failed} failed", refresh=False)
    bar.update(1)
