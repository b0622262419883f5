"""decode_tokens_per_s is None ("not measured") wherever fewer than two decode steps ran, from the
engine's timings through the runtime's results and the rows' stats to the summarize summary,
and every text that shows it says so instead of failing on None or printing 0.0."""

import pytest

from facli.models.resolve import resolve_model
from facli.run.batching import BatchStats, RowRequest
from facli.run.engine import Timings
from facli.run.runtime import load_runtime
from facli.run.sampling import SamplingParams
from facli.run_options import RunOptions
from facli.summarize.job import JobSummary


@pytest.fixture(scope="module")
def runtimes():
    resolved = resolve_model(None)
    one = load_runtime(RunOptions(device="cpu", ctx=64), resolved)
    rows = load_runtime(RunOptions(device="cpu", ctx=64, batch=2), resolved)
    return one, rows


def test_timings_measure_from_the_second_decode_step():
    assert Timings().decode_tokens_per_s is None
    assert Timings(decode_steps=0, decode_s=0.25).decode_tokens_per_s is None
    assert Timings(decode_steps=3, decode_s=0.5).decode_tokens_per_s == pytest.approx(6.0)


@pytest.mark.parametrize("new_tokens, measured", [(1, False), (2, False), (3, True), (6, True)])
def test_a_prompt_run_alone_has_a_rate_only_after_two_decode_steps(runtimes, new_tokens, measured):
    """The first token comes with the prefill; the first decode step is left out of the timing
    (it may compile and capture graphs): three tokens are the fewest with a rate."""
    result = runtimes[0].generate([5, 6, 7, 8], max_new_tokens=new_tokens, sampling=SamplingParams(),
                                  ignore_eos=True)
    assert len(result.token_ids) == new_tokens
    assert result.decode_steps == max(0, new_tokens - 2)
    if measured:
        assert result.decode_tokens_per_s == pytest.approx(result.decode_steps / result.decode_s)
    else:
        assert result.decode_tokens_per_s is None


@pytest.mark.parametrize("new_tokens, measured", [(2, False), (3, True)])
def test_rows_have_a_rate_only_after_two_decode_steps(runtimes, new_tokens, measured):
    queue = [RowRequest([5, 6, 7], new_tokens, key=row) for row in range(2)]
    progress = []
    stats = runtimes[1].generate_rows(lambda: queue.pop() if queue else None, lambda *_: None,
                                      sampling=SamplingParams(), ignore_eos=True,
                                      on_progress=lambda *counts: progress.append(counts))
    assert stats.decode_steps == new_tokens - 1
    assert (stats.decode_tokens_per_s is not None) == measured
    # A prefill event per row (each prompt in one chunk), then a decode event per step.
    assert progress == [(3, 0), (3, 0)] + [(0, 2)] * (new_tokens - 1)
    assert BatchStats(decode_steps=1, decode_tokens=8, decode_s=0.1).decode_tokens_per_s is None


def test_texts_say_not_measured():
    from facli.bench.baseline import describe
    from facli.bench.measure import describe_facli

    record = {"status": "ok", "depth": 64, "ttft_s": 0.1, "prefill_tokens_per_s": 500.0,
              "decode_tokens_per_s": None, "peak_gpu_bytes": None, "plan": None}
    assert describe_facli(record) == ("depth 64: facli TTFT 0.10 s, prefill 500 tok/s, decode not "
                                      "measured")
    assert describe(record) == ("depth 64: transformers TTFT 0.10 s, prefill 500 tok/s, decode "
                                "not measured")
    summary = JobSummary(done=1, prompt_tokens=10, generated_tokens=2, seconds=1.0)
    assert summary.as_dict()["decode_tokens_per_s"] is None
    assert summary.line() == ("facli: summarize: 1 done, 0 failed, 0 skipped; 10 prompt + 2 "
                              "generated tokens in 1.0 s, decode rate not measured (fewer than "
                              "two decode steps)")
    summary.add_decode(30, 1.5)
    assert summary.as_dict()["decode_tokens_per_s"] == 20.0
    assert summary.line().endswith("in 1.0 s, decode 20.0 tokens/s")
