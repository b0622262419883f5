"""summarize's progress line: tokens prefilled and decoded against the estimate, rates and the
time left, redrawn on a terminal, a line per tenth in a log, the final line once; and the loop
feeding it from decode steps (rows) and from generate's callbacks (one document at a time)."""

import io
import re

import pytest

from facli.summarize.job import JobSettings, estimate, run_documents
from facli.summarize.output import ResultWriter
from facli.summarize.progress import LOG_INTERVAL_S, Progress
from facli.summarize.strategies import Budget
from summarize_cases import FakeRowsRuntime, FakeRuntime, small_job


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now

    def tick(self, seconds):
        self.now += seconds


@pytest.fixture(autouse=True)
def _wide_terminal(monkeypatch):
    """Lines are cut to the terminal's width, which differs between a shell and pytest's workers."""
    monkeypatch.setenv("COLUMNS", "300")


class Terminal(io.StringIO):
    def isatty(self):
        return True


def _progress(stream, clock, documents=2, prompt_tokens=1000, decode_tokens=100):
    return Progress("summarize", documents=documents, prompt_tokens=prompt_tokens,
                    decode_tokens=decode_tokens, stream=stream, clock=clock)


def test_log_lines_at_each_tenth_with_rates_and_time_left_then_one_final_line():
    stream, clock = io.StringIO(), Clock()
    progress = _progress(stream, clock, prompt_tokens=200, decode_tokens=1000)
    clock.tick(2.0)
    progress.advance(200, 0)
    for _ in range(9):  # decode steps of 100 rows, 1 s each
        clock.tick(1.0)
        progress.advance(0, 100)
    lines = stream.getvalue().splitlines()
    assert lines[:2] == [
        "summarize: 17% | 0/2 documents, 0 failed | prefill 200/200 tokens at 100.0 tok/s | "
        "decode 0/1,000 tokens | 2.0 s, time left unknown",
        "summarize: 25% | 0/2 documents, 0 failed | prefill 200/200 tokens at 100.0 tok/s | "
        "decode 100/1,000 tokens at 100.0 tok/s | 3.0 s, about 9.0 s left"]
    assert [int(re.search(r"(\d+)%", line)[1]) for line in lines] == [17, 25, 33, 42, 50, 67, 75, 83, 92]
    assert [_counts(line)[4] for line in lines] == [0, 100, 200, 300, 400, 600, 700, 800, 900]
    progress.document_done(failed=False, estimate=(100, 500), actual=(100, 450))
    progress.document_done(failed=True, estimate=(100, 500), actual=(100, 450))
    assert len(stream.getvalue().splitlines()) == 9  # the last line is close()'s
    progress.close()
    progress.close()
    assert stream.getvalue().splitlines()[9:] == [
        "summarize: 100% | 2 documents, 1 failed | prefill 200 tokens at 100.0 tok/s | decode "
        "900 tokens at 100.0 tok/s | 11.0 s"]


def test_a_log_gets_a_line_every_interval_between_tenths():
    stream, clock = io.StringIO(), Clock()
    progress = _progress(stream, clock, prompt_tokens=100_000, decode_tokens=0)
    for _ in range(3):
        clock.tick(LOG_INTERVAL_S / 2)
        progress.advance(10, 0)
    assert [re.search(r"prefill (\S+) tokens", line)[1] for line in stream.getvalue().splitlines()] \
        == ["20/100,000"]


def test_a_terminal_line_is_redrawn_in_place_and_log_messages_go_above_it():
    stream, clock = Terminal(), Clock()
    progress = _progress(stream, clock, documents=1, prompt_tokens=100, decode_tokens=10)
    clock.tick(1.0)
    progress.advance(100, 0)
    clock.tick(0.01)
    progress.advance(0, 1)  # sooner than TERMINAL_INTERVAL_S: not drawn
    clock.tick(1.0)
    progress.advance(0, 1)
    progress.write("facli: a message")
    progress.document_done(failed=False, estimate=(100, 10), actual=(100, 2))
    progress.close()
    text = stream.getvalue()
    draws = text.split("\r\x1b[K")
    assert draws[0] == ""
    assert draws[1].startswith("summarize: 91% | 0/1 documents") and "\n" not in draws[1]
    assert draws[2].startswith("summarize: 93% | 0/1 documents") and "decode 2/10" in draws[2]
    assert draws[3] == "facli: a message\n" + draws[2]
    assert draws[4] == ("summarize: 100% | 1 documents, 0 failed | prefill 100 tokens at "
                        "100.0 tok/s | decode 2 tokens at 2.0 tok/s | 2.0 s\n")
    assert text.count("\n") == 2


def test_a_disabled_progress_writes_nothing():
    stream, clock = io.StringIO(), Clock()
    progress = Progress("summarize", documents=1, prompt_tokens=10, decode_tokens=10,
                        enabled=False, stream=stream, clock=clock)
    progress.advance(10, 0)
    progress.write("message")
    progress.close()
    assert stream.getvalue() == ""


def _lines(stream):
    """The progress lines (the log lines between them left out)."""
    return [line for line in stream.getvalue().splitlines() if line.startswith("summarize: ")]


def _counts(line):
    found = re.search(r"(\d+)/(\d+) documents.*prefill ([\d,]+)/([\d,]+) tokens.*decode "
                      r"([\d,]+)/([\d,]+) tokens", line)
    return tuple(int(group.replace(",", "")) for group in found.groups())


def test_rows_advance_with_every_decode_step_before_any_document_ends(tmp_path):
    """Four documents in four rows, each row ending only at its token budget: the line moves with
    the prefill of each row and then with each decode step, while no document has ended."""
    prepared, settings = small_job(tmp_path, ["one", "two", "three", "four"])
    settings = JobSettings(settings.strategy, Budget(ctx=400, max_new_tokens=101),
                           settings.prompts, settings.sampling)
    runtime = FakeRowsRuntime(rows=4, reply="x" * 200)
    runtime.generate_rows = _rows_in_lockstep(runtime)
    stream = io.StringIO()
    with ResultWriter(tmp_path / "r.jsonl") as writer:
        summary = run_documents(runtime, prepared, writer, settings, stream=stream)
    lines = _lines(stream)
    new = settings.budget.max_new_tokens
    decode_total = 4 * (new - 1)
    prompt_total = sum(estimate(item, settings)[0] for item in prepared)
    counts = [_counts(line) for line in lines[:-1]]
    assert all(c[0] == 0 and c[1] == 4 for c in counts)  # no document ended yet
    decoded = [c[4] for c in counts]
    assert decoded == sorted(decoded) and len([d for d in decoded if 0 < d < decode_total]) >= 3
    assert counts[0][2] < prompt_total  # the prefill of the first rows, before the others
    assert lines[-1].startswith(f"summarize: 100% | 4 documents, 0 failed | prefill {prompt_total} "
                                f"tokens") and f"decode {decode_total} tokens" in lines[-1]
    assert summary.done == 4 and summary.decode_tokens_per_s == pytest.approx(4 * (new - 1) / 0.3)


def _rows_in_lockstep(runtime):
    """generate_rows of rows that all run to their token budget together: a prefill event per
    prompt, then one decode event of every row per step, then every row ends."""
    from facli.run.batching import BatchStats

    def generate_rows(next_request, on_done, *, sampling, on_progress):
        requests = []
        while len(requests) < runtime.rows and (request := next_request()) is not None:
            requests.append(request)
            on_progress(len(request.prompt_ids), 0)
        steps = requests[0].max_new_tokens - 1
        for _ in range(steps):
            on_progress(0, len(requests))
        for request in requests:
            on_done(request, runtime.generate(request.prompt_ids, max_new_tokens=request.max_new_tokens,
                                              sampling=sampling))
        return BatchStats(prompts=len(requests), decode_steps=steps, decode_s=0.3,
                          decode_tokens=steps * len(requests))

    return generate_rows


def test_documents_one_at_a_time_advance_with_prefill_chunks_and_decoded_text(tmp_path):
    prepared, settings = small_job(tmp_path, ["one", "", "x" * 500, "four"])  # ok, empty, too long, ok
    runtime = FakeRuntime(reply="ab")
    runtime.prefill_chunk = 8  # prompts of about 60 tokens: several chunks each
    stream = io.StringIO()
    with ResultWriter(tmp_path / "r.jsonl") as writer:
        summary = run_documents(runtime, prepared, writer, settings, stream=stream)
    lines = _lines(stream)
    prefilled = [_counts(line)[2] for line in lines[:-1]]
    assert len(lines) > 3 and prefilled == sorted(prefilled)
    prompt_total = sum(estimate(item, settings)[0] for item in prepared)
    assert prompt_total == sum(n for n, _ in runtime.calls)
    assert lines[-1].startswith(f"summarize: 100% | 4 documents, 2 failed | prefill {prompt_total} "
                                "tokens")
    assert re.search(r"\| decode 2 tokens( at [\d.,]+ tok/s)? \|", lines[-1])  # "ab": 1 each
    assert summary.decode_tokens_per_s is None  # two tokens a prompt: one decode step each
