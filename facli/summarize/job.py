"""The per-document loop: summarize, record, show progress, stop cleanly when asked.

`run_documents` is a plain function of (runtime, documents, writer) so that every tensor-parallel
rank can run it in step; only the writer rank (rank 0) writes records and shows progress.
"""

import time
from dataclasses import dataclass
from typing import Callable, Sequence

from facli.errors import FacliError
from facli.summarize import strategies
from facli.summarize.batched import run_batched
from facli.summarize.faults import OomGuard
from facli.summarize.interrupt import StopRequest
from facli.summarize.output import ResultWriter, make_record
from facli.summarize.planning import PreparedDocument, prompt_lengths
from facli.summarize.progress import Progress
from facli.summarize.prompting import Prompts
from facli.summarize.strategies import Budget, DocumentFailed, Outcome, Strategy


@dataclass(frozen=True)
class JobSettings:
    strategy: Strategy
    budget: Budget
    prompts: Prompts
    sampling: object  # facli.run.sampling.SamplingParams


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
    skipped_ok: int = 0  # of the skipped, those summarized by an earlier run
    decode_tokens: int = 0  # tokens of the decode steps that were timed, and their seconds
    decode_s: float = 0.0

    @property
    def decode_tokens_per_s(self) -> float | None:
        """None (not measured) when fewer than two decode steps ran."""
        return self.decode_tokens / self.decode_s if self.decode_tokens and self.decode_s > 0 else None

    @property
    def none_succeeded(self) -> bool:
        """Documents ran, every one failed, and none was summarized by an earlier run either."""
        return self.failed > 0 and self.done == 0 and self.skipped_ok == 0 and not self.interrupted

    def add(self, record: dict) -> None:
        if record["status"] == "ok":
            self.done += 1
        else:
            self.failed += 1
        self.prompt_tokens += record["prompt_tokens"]
        self.generated_tokens += record["generated_tokens"]

    def add_decode(self, tokens: int, seconds: float) -> None:
        """Decode steps timed by the engine (engine.Timings, batching.BatchStats)."""
        self.decode_tokens += tokens
        self.decode_s += seconds

    def merge(self, other: "JobSummary") -> None:
        """Add the counts and seconds of a later part of the same run."""
        for name in ("done", "failed", "skipped", "prompt_tokens", "generated_tokens",
                     "seconds", "generation_s", "skipped_ok", "decode_tokens", "decode_s"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.interrupted = self.interrupted or other.interrupted

    def as_dict(self) -> dict:
        rate = self.decode_tokens_per_s
        return {"done": self.done, "failed": self.failed, "skipped": self.skipped,
                "prompt_tokens": self.prompt_tokens, "generated_tokens": self.generated_tokens,
                "seconds": round(self.seconds, 3), "generation_s": round(self.generation_s, 3),
                "decode_tokens_per_s": None if rate is None else round(rate, 3),
                "interrupted": self.interrupted}

    def line(self) -> str:
        stopped = "; interrupted, rerun the same command to resume" if self.interrupted else ""
        rate = self.decode_tokens_per_s
        decode = (f", decode {rate:.1f} tokens/s" if rate is not None else
                  ", decode rate not measured (fewer than two decode steps)"
                  if self.generated_tokens else "")
        return (
            f"facli: summarize: {self.done} done, {self.failed} failed, {self.skipped} skipped; "
            f"{self.prompt_tokens} prompt + {self.generated_tokens} generated tokens in "
            f"{self.seconds:.1f} s{decode}{stopped}"
        )

    def failure_line(self, out) -> str:
        """The error when none_succeeded."""
        return (f"expected at least one document summarized, got all {self.failed} failed (the "
                f"\"error\" of each record in {out} says why); fix the cause and rerun with "
                "--retry-failed")


def estimate(item: PreparedDocument, settings: JobSettings) -> tuple[int, int, int]:
    """(prompt tokens, decoded tokens, prompts) the document should take, every summary
    --max-new-tokens long (its first token comes with the prefill, the others from decode)."""
    lengths = prompt_lengths(item, settings)
    return sum(lengths), len(lengths) * (settings.budget.max_new_tokens - 1), len(lengths)


def run_documents(runtime, items: Sequence[PreparedDocument], writer: ResultWriter | None,
                  settings: JobSettings, *, stop: StopRequest | None = None,
                  is_writer: bool = True, agree: Callable[[bool], bool] | None = None,
                  label: str = "summarize", stream=None) -> JobSummary:
    """Summarize `items`, appending one record per document as it finishes.

    With a runtime of several rows (runtime.rows) documents run side by side and their records
    come in the order they finish; otherwise one after another. Progress in tokens goes to
    `stream` (stderr) on the writer rank (facli.summarize.progress). A first Ctrl-C (see
    StopRequest) starts no new document and ends the loop once those in progress are recorded;
    a second abandons them. Either way the summary comes back with `interrupted` set and
    nothing half-written. `agree(requested) -> bool` (a collective, with several ranks) makes
    every rank stop together.
    """
    assert writer is not None or not is_writer, "the writer rank needs a ResultWriter"
    stop = stop or StopRequest()
    summary = JobSummary()
    estimates = {item.document.id: estimate(item, settings) for item in items}
    progress = Progress(label, documents=len(items),
                        prompt_tokens=sum(e[0] for e in estimates.values()),
                        decode_tokens=sum(e[1] for e in estimates.values()),
                        enabled=is_writer, stream=stream)
    started = time.perf_counter()

    def record(item: PreparedDocument, entry: dict) -> None:
        with stop.deferred():
            if is_writer:
                writer.append(entry)
            summary.add(entry)
        expected = estimates[item.document.id]
        progress.document_done(failed=entry["status"] != "ok", estimate=expected[:2],
                               actual=_actual(entry, expected))

    def stop_agreed() -> bool:
        summary.interrupted = agree(stop.requested) if agree else stop.requested
        return summary.interrupted

    def timed(generate):
        def run(prompt_ids):
            result = generate(prompt_ids)
            if result.decode_tokens_per_s is not None:
                summary.add_decode(result.decode_steps, result.decode_s)
            return result

        return run

    try:
        remaining = list(items)
        if getattr(runtime, "rows", 1) > 1:
            remaining, stats = run_batched(
                runtime, remaining, settings,
                on_outcome=lambda item, outcome, since: record(item, document_record(item, outcome, since)),
                may_start=lambda: not stop_agreed(), log=progress.write,
                on_progress=progress.advance)
            if stats is not None and stats.decode_tokens_per_s is not None:
                summary.add_decode(stats.decode_tokens, stats.decode_s)
        generate = timed(OomGuard(runtime, max_new_tokens=settings.budget.max_new_tokens,
                                  sampling=settings.sampling, log=progress.write,
                                  progress=progress))
        for item in remaining:
            if summary.interrupted:
                break
            record(item, summarize_document(item, settings, generate))
            stop_agreed()
    except KeyboardInterrupt:
        summary.interrupted = True
        progress.write("facli: abandoned the documents in progress")
    finally:
        progress.close()
        summary.generation_s = time.perf_counter() - started
    return summary


def _actual(entry: dict, expected: tuple[int, int, int]) -> tuple[int, int]:
    """(prompt tokens, decoded tokens) a recorded document took; a document that runs no prompt
    (unusable, or too long for --strategy fit) took none, whatever its record counts."""
    if expected == (0, 0, 0):
        return 0, 0
    return entry["prompt_tokens"], max(0, entry["generated_tokens"] - expected[2])


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
