"""summarize with rows, against a fake runtime: documents side by side, their records as they
finish, out of memory, stop requests, map-reduce chunks, and documents grouped by length."""

import json
import math

from facli.summarize.interrupt import StopRequest
from facli.summarize.job import JobSettings, run_documents
from facli.summarize.output import ResultWriter
from facli.summarize.row_groups import context_needed, length_buckets, merge_buckets
from facli.summarize.strategies import Budget, Strategy
from summarize_cases import FakeRowsRuntime, small_job


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _order(path):
    """The documents' numbers in the order of their records."""
    return [int(r["id"].split("/")[1][:2]) for r in _records(path)]


def test_rows_run_documents_side_by_side_and_record_them_as_they_finish(tmp_path, capsys):
    prepared, settings = small_job(tmp_path, ["one", "", "x" * 500, "four", "five"])
    runtime = FakeRowsRuntime(rows=2)
    with ResultWriter(tmp_path / "r.jsonl") as writer:
        summary = run_documents(runtime, prepared, writer, settings)
    records = _records(tmp_path / "r.jsonl")
    # "" and the too-long document are recorded as they are reached; of two in rows, the newest
    # ends first.
    assert _order(tmp_path / "r.jsonl") == [1, 2, 3, 4, 0]
    assert [r["status"] for r in records] == ["failed", "failed", "ok", "ok", "ok"]
    assert runtime.batches[0] == 2 and len(runtime.calls) == 3
    assert (summary.done, summary.failed, summary.interrupted) == (3, 2, False)
    # Steps of 2, 2 and 1 busy rows (the fake ends one prompt per step).
    assert "facli: 2 rows: 3 prompts, 0.0 s of prefill, 3 decode steps with 1.7 rows busy on " \
        "average" in capsys.readouterr().err


def test_rows_out_of_memory_goes_on_one_document_at_a_time(tmp_path):
    prepared, settings = small_job(tmp_path, ["one", "two", "three", "four"])
    runtime = FakeRowsRuntime(rows=3, oom_after=1)
    with ResultWriter(tmp_path / "r.jsonl") as writer:
        summary = run_documents(runtime, prepared, writer, settings)
    records = _records(tmp_path / "r.jsonl")
    assert runtime.rows == 1 and summary.done == 4
    # The one that ended in rows (the third), then the two in progress again, then the last.
    assert _order(tmp_path / "r.jsonl") == [2, 0, 1, 3]
    assert all(r["status"] == "ok" for r in records)


def test_stop_request_with_rows_finishes_the_documents_in_progress(tmp_path):
    prepared, settings = small_job(tmp_path, ["one", "two", "three", "four", "five"])
    stop = StopRequest(announce=False)
    runtime = FakeRowsRuntime(rows=2, on_finish=lambda: setattr(stop, "requested", True))
    with ResultWriter(tmp_path / "r.jsonl") as writer:
        summary = run_documents(runtime, prepared, writer, settings, stop=stop)
    assert summary.interrupted and summary.done == 2
    assert _order(tmp_path / "r.jsonl") == [1, 0]


def test_map_reduce_chunks_of_one_document_share_the_rows(tmp_path):
    prepared, settings = small_job(tmp_path, ["y" * 450])
    settings = JobSettings(Strategy.MAP_REDUCE, settings.budget, settings.prompts, settings.sampling)
    runtime = FakeRowsRuntime(rows=8, reply="s")
    with ResultWriter(tmp_path / "r.jsonl") as writer:
        summary = run_documents(runtime, prepared, writer, settings)
    (record,) = _records(tmp_path / "r.jsonl")
    chunks = math.ceil(450 / settings.budget.document_tokens(settings.prompts.summarize))
    assert chunks >= 3 and runtime.batches[0] == chunks  # every chunk in a row at once
    assert runtime.batches[-1] == 1 and len(runtime.calls) == chunks + 1  # then the combined
    assert record["status"] == "ok" and summary.done == 1


def test_rows_fail_a_prompt_longer_than_the_runtime_context_alone(tmp_path):
    prepared, settings = small_job(tmp_path, ["one", "x" * 80, "three"])  # fits ctx 200, not 100
    runtime = FakeRowsRuntime(rows=2, ctx=100)
    with ResultWriter(tmp_path / "r.jsonl") as writer:
        summary = run_documents(runtime, prepared, writer, settings)
    status = {n: r["status"] for n, r in zip(_order(tmp_path / "r.jsonl"), _records(tmp_path / "r.jsonl"))}
    assert status == {0: "ok", 1: "failed", 2: "ok"} and summary.done == 2
    assert "expected a prompt shorter than --ctx (100 tokens)" in _records(tmp_path / "r.jsonl")[0]["error"]


# documents grouped by length for rows


def _groupsmall_job(tmp_path, lengths, strategy=Strategy.FIT, ctx=2000):
    texts = ["x" * n for n in lengths]
    prepared, settings = small_job(tmp_path, texts)
    settings = JobSettings(strategy, Budget(ctx=ctx, max_new_tokens=4), settings.prompts, settings.sampling)
    return prepared, settings


def test_context_needed_by_strategy(tmp_path):
    prepared, settings = _groupsmall_job(tmp_path, [10, 5000, 0])
    overhead = settings.prompts.summarize.overhead
    assert context_needed(prepared[0], settings, 1500) == 10 + overhead + 4
    assert context_needed(prepared[1], settings, 1500) == 0  # fit: recorded as failed, no prompt
    assert context_needed(prepared[2], settings, 1500) == 0  # empty: unusable
    truncate = JobSettings(Strategy.TRUNCATE, settings.budget, settings.prompts, settings.sampling)
    assert context_needed(prepared[1], truncate, 1500) == 1500


def test_length_buckets_are_powers_of_two_shortest_first(tmp_path):
    prepared, settings = _groupsmall_job(tmp_path, [0, 900, 10, 20, 1700, 300])
    buckets = length_buckets(prepared, settings, 1800)
    overhead = settings.prompts.summarize.overhead
    assert [ctx for ctx, _ in buckets] == [
        1 << (10 + overhead + 4 - 1).bit_length(), 512, 1024, 1800]
    # The empty document joins the first bucket, beside the two shortest.
    assert sorted(len(items) for _, items in buckets) == [1, 1, 1, 3]
    assert len(buckets[0][1]) == 3 and buckets[0][1][0].ids is None


def test_buckets_split_only_where_the_shorter_group_runs_wider(tmp_path):
    prepared, settings = _groupsmall_job(tmp_path, [10] * 5 + [300] * 2 + [1700])
    buckets = length_buckets(prepared, settings, 1800)
    assert [len(items) for _, items in buckets] == [5, 2, 1]
    shortest = buckets[0][0]
    # 512 holds 7 rows: the first two buckets run as one group; 1800 holds only 3.
    groups = merge_buckets(buckets, [64, 7, 3], settings, cap=64)
    assert [(g.ctx, g.rows, len(g.items)) for g in groups] == [(512, 7, 7), (1800, 1, 1)]
    # 6 rows at 512 still beat the 5 documents alone; then 3 rows at 1800 lose to 6.
    groups = merge_buckets(buckets, [64, 6, 3], settings, cap=64)
    assert [(g.ctx, g.rows, len(g.items)) for g in groups] == [(512, 6, 7), (1800, 1, 1)]
    # 4 rows at 512 lose to the 5 short documents in rows of their own.
    groups = merge_buckets(buckets, [64, 4, 3], settings, cap=64)
    assert [(g.ctx, g.rows, len(g.items)) for g in groups] == [(shortest, 5, 5), (1800, 3, 3)]
    # The cap: at most `cap` rows, so wider short groups buy nothing.
    groups = merge_buckets(buckets, [64, 4, 4], settings, cap=4)
    assert [(g.rows, len(g.items)) for g in groups] == [(4, 8)]
    assert "8 documents in 4 rows of 1800 tokens" == groups[0].describe()
