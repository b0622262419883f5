"""The progress line of a summarize run, in tokens: prompt tokens prefilled and tokens decoded,
each against the run's estimate, with their rates and the time left.

Documents decoded in rows finish together at the end of their decode, so a count of documents
stands still for minutes and then jumps; prefill chunks and decode steps come every fraction of
a second. On a terminal the line is redrawn in place; elsewhere (a log file, a pipe) a new line
is printed at each tenth of the work and at least every LOG_INTERVAL_S. Either way the final
line is printed once, by close().
"""

import shutil
import sys
import time
from dataclasses import dataclass

from facli.units import format_seconds

TERMINAL_INTERVAL_S = 0.2  # redraws of the line on a terminal, at most this often
LOG_INTERVAL_S = 60.0  # a line in a log at least this often while work goes on
LOG_STEPS = 10  # ... and one at each tenth of the tokens


@dataclass
class Work:
    """Tokens of one kind: done so far, the estimate of all, and the seconds spent on them."""

    done: int = 0
    total: int = 0
    seconds: float = 0.0

    @property
    def rate(self) -> float | None:
        return self.done / self.seconds if self.done and self.seconds > 0 else None

    @property
    def left(self) -> int:
        return max(0, self.total - self.done)

    def describe(self, name: str, final: bool) -> str:
        amount = f"{self.done:,}" if final else f"{self.done:,}/{max(self.total, self.done):,}"
        rate = self.rate
        return f"{name} {amount} tokens" + (f" at {rate:,.1f} tok/s" if rate is not None else "")


class Progress:
    """Counts the work of a group of documents and shows it on `stream` (stderr).

    advance(prefilled, decoded) as prefill chunks and decode steps run: the time since the
    previous call is counted as prefill time when no token was decoded, else as decode time.
    document_done(...) as each document is recorded, which also replaces the document's
    estimated tokens by what it took. Totals start from the estimate (every summary
    --max-new-tokens long); early ends shrink them as documents finish.
    """

    def __init__(self, label: str, *, documents: int, prompt_tokens: int, decode_tokens: int,
                 enabled: bool = True, stream=None, clock=time.perf_counter):
        self.label, self.enabled = label, enabled
        self.stream = stream if stream is not None else sys.stderr
        self.terminal = enabled and _is_terminal(self.stream)
        self.clock = clock
        self.documents, self.finished, self.failed = documents, 0, 0
        self.prefill = Work(total=prompt_tokens)
        self.decode = Work(total=decode_tokens)
        self.started = self._last_event = clock()
        self._shown_at, self._shown_step, self._drawn = self.started, 0, False
        self._closed = False

    def advance(self, prefilled: int = 0, decoded: int = 0) -> None:
        now = self.clock()
        spent, self._last_event = now - self._last_event, now
        work = self.decode if decoded else self.prefill
        work.seconds += spent
        self.prefill.done += prefilled
        self.decode.done += decoded
        self._show(now)

    def document_done(self, *, failed: bool, estimate: tuple[int, int],
                      actual: tuple[int, int]) -> None:
        """One document recorded: its (prompt, decoded) token estimate becomes `actual`."""
        self.finished += 1
        self.failed += failed
        self.prefill.total += actual[0] - estimate[0]
        self.decode.total += actual[1] - estimate[1]
        self._show(self.clock())

    def fraction(self) -> float:
        done = self.prefill.done + self.decode.done
        total = max(self.prefill.total, self.prefill.done) + max(self.decode.total, self.decode.done)
        if not total:  # documents that run no prompt (unusable, too long to fit)
            return self.finished / self.documents if self.documents else 1.0
        return done / total

    def seconds_left(self) -> float | None:
        """Tokens left of each kind at the rate measured for it; None until a rate is known
        for every kind with tokens left."""
        left = 0.0
        for work in (self.prefill, self.decode):
            if work.left:
                if work.rate is None:
                    return None
                left += work.left / work.rate
        return left

    def line(self, final: bool = False) -> str:
        elapsed = format_seconds(self.clock() - self.started)
        if final:
            timing = elapsed
        else:
            left = self.seconds_left()
            timing = f"{elapsed}, " + ("time left unknown" if left is None else
                                       f"about {format_seconds(left)} left")
        all_done = final and self.finished == self.documents
        documents = f"{self.documents}" if all_done else f"{self.finished}/{self.documents}"
        return (f"{self.label}: {self.fraction():.0%} | {documents} documents, {self.failed} "
                f"failed | {self.prefill.describe('prefill', final)} | "
                f"{self.decode.describe('decode', final)} | {timing}")

    def write(self, message: str) -> None:
        """A log line that leaves the progress line intact below it."""
        if not self.enabled:
            return
        if self._drawn:
            self.stream.write("\r\x1b[K")
        self.stream.write(message + "\n")
        if self._drawn:
            self.stream.write(self._fit(self.line()))
        self.stream.flush()

    def close(self) -> None:
        """The final line, once."""
        if not self.enabled or self._closed:
            return
        self._closed = True
        self.stream.write(("\r\x1b[K" if self._drawn else "") + self.line(final=True) + "\n")
        self.stream.flush()

    def _show(self, now: float) -> None:
        if not self.enabled or self._closed or self.finished >= self.documents:
            return  # the last line is close()'s
        if self.terminal:
            if now - self._shown_at >= TERMINAL_INTERVAL_S:
                self.stream.write("\r\x1b[K" + self._fit(self.line()))
                self.stream.flush()
                self._shown_at, self._drawn = now, True
            return
        step = int(self.fraction() * LOG_STEPS)
        if step > self._shown_step or now - self._shown_at >= LOG_INTERVAL_S:
            self.stream.write(self.line() + "\n")
            self.stream.flush()
            self._shown_at, self._shown_step = now, max(step, self._shown_step)

    @staticmethod
    def _fit(line: str) -> str:
        width = shutil.get_terminal_size(fallback=(120, 24)).columns - 1
        return line if len(line) <= width else line[:max(width - 3, 0)] + "..."


class PromptProgress:
    """Runtime.generate's callbacks for one prompt run alone: on_progress for each prefill
    chunk, on_text for each piece of text, one a decoded token (the first piece is the token
    that comes with the prefill). finish() counts the tokens that gave no text."""

    def __init__(self, progress: Progress):
        self.progress, self.pieces = progress, 0

    def on_progress(self, tokens: int) -> None:
        self.progress.advance(tokens, 0)

    def on_text(self, piece: str) -> None:
        self.pieces += 1
        self.progress.advance(0, 1 if self.pieces > 1 else 0)

    def finish(self, token_ids) -> None:
        missing = max(0, len(token_ids) - 1) - max(0, self.pieces - 1)
        if missing > 0:
            self.progress.advance(0, missing)


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
