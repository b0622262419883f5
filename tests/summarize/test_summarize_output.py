"""facli summarize's output file: appended records, partial lines, atomic rewrites, the lock
that keeps two runs apart, and an --out that cannot be written, all before any model loads."""

import json

import pytest

from facli.errors import FacliError
from facli.run_options import RunOptions
from facli.summarize import run as summarize_run
from facli.summarize.output import ResultWriter, check_writable, make_record, read_results


def _record(doc_id, status="ok"):
    return make_record(doc_id, "src", summary="s" if status == "ok" else None, prompt_tokens=1,
                       generated_tokens=1, seconds=0.5, error=None if status == "ok" else "bad")


def test_partial_last_line_is_ignored_and_cut_before_appending(tmp_path):
    out = tmp_path / "r.jsonl"
    with ResultWriter(out) as writer:
        writer.append(_record("a"))
    with open(out, "ab") as handle:
        handle.write(b'{"id": "b", "source": "src", "summ')
    existing = read_results(out)
    assert set(existing.records) == {"a"} and existing.partial_bytes > 0
    with ResultWriter(out) as writer:
        writer.repair(existing)
        writer.append(_record("b"))
    lines = out.read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == ["a", "b"]
    assert list(json.loads(lines[0])) == ["id", "source", "summary", "prompt_tokens",
                                          "generated_tokens", "seconds", "status", "error"]


def test_drop_rewrites_without_the_records_and_appends_after(tmp_path):
    out = tmp_path / "r.jsonl"
    with ResultWriter(out) as writer:
        for doc_id, status in (("a", "ok"), ("b", "failed"), ("c", "failed")):
            writer.append(_record(doc_id, status))
        assert read_results(out).ids_with_status("failed") == {"b", "c"}
        writer.drop({"b"})
        writer.append(_record("b"))
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ["a", "c", "b"]
    assert not list(tmp_path.glob(".*.tmp"))


def test_second_writer_on_the_same_output_is_refused(tmp_path):
    with ResultWriter(tmp_path / "r.jsonl"):
        with pytest.raises(FacliError, match="no other run writing"):
            ResultWriter(tmp_path / "r.jsonl")


@pytest.mark.parametrize("out, message", [
    ("folder", "expected a regular file for --out, got {out}: a directory; give a path for a "
               "results file such as results.jsonl"),
    ("file.txt/results.jsonl", "expected a writable --out file, got {out}: Not a directory; "
                               "choose another path"),
])
def test_an_output_that_cannot_be_written_fails_before_any_document_is_read(
        tmp_path, monkeypatch, out, message):
    (tmp_path / "folder").mkdir()
    (tmp_path / "file.txt").write_text("a document\n")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs/a.txt").write_text("a document\n")
    monkeypatch.setattr(summarize_run, "open_corpus", lambda *args, **kwargs: pytest.fail("read"))
    with pytest.raises(FacliError) as err:
        summarize_run.run_summarize(summarize_run.SummarizeRequest(
            inputs=(tmp_path / "docs",), out=tmp_path / out,
            run=RunOptions(device="cpu", batch=None)))
    assert str(err.value) == message.format(out=tmp_path / out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs", "file.txt", "folder"]
    check_writable(tmp_path / "new/deeper/results.jsonl")  # folders to make are fine
    check_writable(tmp_path / "docs/a.txt")


def test_a_second_run_on_the_same_output_stops_before_reading_the_corpus(tmp_path, monkeypatch):
    (tmp_path / "docs").mkdir()
    out = tmp_path / "r.jsonl"
    request = summarize_run.SummarizeRequest(inputs=(tmp_path / "docs",), out=out,
                                             run=RunOptions(device="cpu", batch=None))
    monkeypatch.setattr(summarize_run, "open_corpus", lambda *args, **kwargs: pytest.fail("read"))
    with ResultWriter(out):
        with pytest.raises(FacliError, match="no other run writing"):
            summarize_run.run_summarize(request)

    def bad_corpus(*args, **kwargs):
        raise FacliError("expected documents")

    monkeypatch.setattr(summarize_run, "open_corpus", bad_corpus)
    with pytest.raises(FacliError, match="expected documents"):
        summarize_run.run_summarize(request)
    assert not out.exists()  # the output is created with its first record, not before
