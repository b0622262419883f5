"""The files a summarize run reads and writes, piece by piece: --out must be a regular file (or
a new path), every read of a user file is bounded and never blocks, an output that is not
summarize's is refused untouched, and nothing is left beside a refused or failed start."""

import json
import os
import socket
import threading
from pathlib import Path

import pytest

from facli.errors import FacliError
from facli.run_options import RunOptions
from facli.summarize import files, manifest as manifests
from facli.summarize import run as summarize_run
from facli.summarize.documents import discover, read_documents
from facli.summarize.files import check_output_path, read_regular, read_user_file
from facli.summarize.output import ResultWriter, lock_path, make_record, read_results
from facli.summarize.prompting import read_template

REGULAR_HINT = "give a path for a results file such as results.jsonl"


def _record(doc_id: str) -> dict:
    return make_record(doc_id, "src", summary="s", prompt_tokens=1, generated_tokens=1,
                       seconds=0.5, error=None)


def _line(doc_id: str) -> bytes:
    return (json.dumps(_record(doc_id)) + "\n").encode()


@pytest.fixture
def fifo(tmp_path):
    path = tmp_path / "pipe.jsonl"
    os.mkfifo(path)
    return path


@pytest.fixture
def unix_socket(tmp_path):
    path = tmp_path / "s.jsonl"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    yield path
    server.close()


@pytest.mark.parametrize("name, kind", [("/dev/null", "a character device"),
                                        ("/dev/full", "a character device"),
                                        ("FIFO", "a pipe"), ("SOCKET", "a socket"),
                                        ("DIR", "a directory")])
def test_out_that_is_no_regular_file_is_refused(tmp_path, fifo, unix_socket, name, kind):
    path = {"FIFO": fifo, "SOCKET": unix_socket, "DIR": tmp_path}.get(name, Path(name))
    if not path.exists():
        pytest.skip(f"no {path} here")
    with pytest.raises(FacliError) as err:
        check_output_path(path)
    assert str(err.value) == f"expected a regular file for --out, got {path}: {kind}; {REGULAR_HINT}"


def test_out_dash_and_standard_streams_are_refused():
    with pytest.raises(FacliError, match=r"^expected a file path for --out, got '-'; "):
        check_output_path(Path("-"))
    for stream in ("/dev/stdout", "/dev/stderr", "/dev/fd/1", "/proc/self/fd/2"):
        # Whatever the stream is (a pipe here, a terminal or a file elsewhere), never an output.
        with pytest.raises(FacliError, match=r"^expected (a regular file for --out|--out outside "
                                             r"/dev, /proc and /sys), got "):
            check_output_path(Path(stream))


def test_new_paths_regular_files_and_dev_shm_pass(tmp_path):
    check_output_path(tmp_path / "new" / "deeper" / "results.jsonl")
    (tmp_path / "old.jsonl").write_bytes(b"")
    check_output_path(tmp_path / "old.jsonl")
    if Path("/dev/shm").is_dir():
        check_output_path(Path("/dev/shm/facli-results-that-do-not-exist.jsonl"))


def test_reads_refuse_pipes_without_blocking_and_stop_at_the_limit(tmp_path, fifo):
    """Were a pipe opened for reading, the open would wait for a writer: the test would hang
    (the thread and its join timeout catch that)."""
    outcome = {}

    def read():
        try:
            read_regular(fifo, 100)
        except files.NotRegularError as exc:
            outcome["kind"] = exc.kind

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout=10)
    assert not reader.is_alive() and outcome == {"kind": "a pipe"}
    with pytest.raises(files.NotRegularError):
        read_regular(Path("/dev/zero"), 100)  # a device reads without end
    big = tmp_path / "big.txt"
    big.write_bytes(b"x" * 101)
    with pytest.raises(files.TooLargeError):
        read_regular(big, 100)
    assert read_regular(big, 101) == b"x" * 101
    with pytest.raises(FacliError) as err:
        read_user_file(big, 100, "--prompt-template", "shorten it")
    assert str(err.value) == f"expected --prompt-template of at most 100 B, got {big}: 101 B; shorten it"


def test_documents_over_their_limit_or_no_regular_file_are_failed_records(tmp_path, monkeypatch, fifo):
    monkeypatch.setattr("facli.summarize.documents.DOCUMENT_LIMIT", 1000)
    monkeypatch.setattr("facli.summarize.documents.JSONL_LIMIT", 3000)
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "big.txt").write_text("word " * 201)
    (docs / "ok.txt").write_text("word " * 200)
    (docs / "many.jsonl").write_text(json.dumps({"text": "w" * 3000}) + "\n")
    (docs / "records.jsonl").write_text(json.dumps({"id": "long", "text": "w" * 1000}) + "\n"
                                        + json.dumps({"id": "short", "text": "w"}) + "\n")
    found = {d.id.split("#")[0]: d for d in read_documents(discover([docs]))}
    assert found["docs/big.txt"].error == ("expected a file of at most 1000 B, got 1005 B, over "
                                           "the 1000 B limit; split it into smaller files")
    assert found["docs/ok.txt"].error is None
    assert found["docs/many.jsonl"].error.startswith("expected a file of at most 2.9 KiB, got")
    assert found["docs/records.jsonl:1"].error.startswith("expected a record of at most 1000 B")
    assert found["short"].text == "w"
    # A pipe named as an input is refused at once, in one line; one inside a folder is no file.
    with pytest.raises(FacliError, match=r"expected a regular file or directory, got '.*pipe.jsonl': "
                                         r"a pipe; save the documents to files"):
        discover([fifo])


def test_template_and_manifest_reads_are_bounded_and_checked(tmp_path, monkeypatch):
    with pytest.raises(FacliError, match=r"^expected --prompt-template to be a regular file, got "
                                         r"/dev/zero: a character device; give a UTF-8 text file"):
        read_template(Path("/dev/zero"))
    monkeypatch.setattr("facli.summarize.prompting.TEMPLATE_LIMIT", 50)
    template = tmp_path / "t.txt"
    template.write_text("{document}" + " " * 50)
    with pytest.raises(FacliError, match=r"of at most 50 B, got .*t.txt: 60 B;"):
        read_template(template)
    manifest = tmp_path / "r.manifest.json"
    manifest.write_text("[1, 2]")
    with pytest.raises(FacliError, match=r"expected a run manifest at .* \(a JSON object with "
                                         r"model, settings and runs\), got list"):
        manifests.read_manifest(manifest)
    monkeypatch.setattr("facli.summarize.manifest.MANIFEST_LIMIT", 10)
    manifest.write_text(json.dumps({"runs": []}))
    with pytest.raises(FacliError, match=r"expected run manifest of at most 10 B"):
        manifests.read_manifest(manifest)


@pytest.mark.parametrize("content, reason", [
    (b"hello world\nsecond line", "line 1 is not JSON"),
    (b'{"a": 1}\n', "line 1 is a JSON object without the fields id, source, summary"),
    (_line("a") + b"[1, 2]\n", "line 2 is a JSON list, not an object"),
    (_line("a") + b"notes without a newline", "line 2 is not JSON"),
    (_line("a").replace(b'"ok"', b'"done"'), 'line 1 is a JSON object whose "id" is no string or'),
    (b"\xff\xfe\n", "line 1 is not UTF-8"),
], ids=["text", "other-json", "json-list", "text-tail", "other-status", "binary"])
def test_an_output_that_is_not_summarize_results_is_refused_untouched(tmp_path, content, reason):
    out = tmp_path / "r.jsonl"
    out.write_bytes(content)
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("a document")
    with pytest.raises(FacliError) as err:
        summarize_run.run_summarize(summarize_run.SummarizeRequest(
            inputs=(docs,), out=out, run=RunOptions(device="cpu", batch=None)))
    assert str(err.value).startswith("expected --out to be a results file of facli summarize")
    assert reason in str(err.value) and str(err.value).endswith("(summarize appends only to its "
                                                                "own results)")
    assert out.read_bytes() == content
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs", "r.jsonl"]


def test_a_whole_last_record_without_its_newline_is_kept(tmp_path):
    out = tmp_path / "r.jsonl"
    out.write_bytes(_line("a") + _line("b").rstrip(b"\n"))
    existing = read_results(out)
    assert set(existing.records) == {"a", "b"} and existing.unterminated and not existing.partial_bytes
    with ResultWriter(out) as writer:
        writer.repair(existing)
        writer.append(_record("c"))
    assert out.read_bytes() == _line("a") + _line("b") + _line("c")


def test_the_lock_file_goes_with_the_run_and_so_do_folders_made_for_nothing(tmp_path):
    out = tmp_path / "new" / "deeper" / "r.jsonl"
    written = []
    with ResultWriter(out) as writer:
        assert lock_path(out).is_file()
        writer.before_first_write = lambda: written.append("manifest")
    assert not (tmp_path / "new").exists() and written == []
    with ResultWriter(out) as writer:
        writer.before_first_write = lambda: written.append("manifest")
        writer.append(_record("a"))
        writer.append(_record("b"))
    assert written == ["manifest"] and sorted(p.name for p in out.parent.iterdir()) == ["r.jsonl"]


def test_a_lock_file_removed_by_its_run_is_made_again(tmp_path, monkeypatch):
    """A run that opened the lock file just before its holder removed it must not lock the
    removed file: it would run beside a third run that locked the new one."""
    out = tmp_path / "r.jsonl"
    real_open = os.open
    replaced = []

    def open_then_replace(path, flags, mode=0o777):
        fd = real_open(path, flags, mode)
        if str(path).endswith(".lock") and not replaced:
            replaced.append(path)
            os.unlink(path)  # what the run holding it does as it ends
        return fd

    monkeypatch.setattr("facli.summarize.output.os.open", open_then_replace)
    with ResultWriter(out):
        assert replaced and lock_path(out).is_file()
        monkeypatch.setattr("facli.summarize.output.os.open", real_open)
        with pytest.raises(FacliError, match="no other run writing"):
            ResultWriter(out)
    assert not lock_path(out).exists()


def test_a_lock_path_that_is_no_file_is_refused(tmp_path):
    out = tmp_path / "r.jsonl"
    lock_path(out).mkdir()
    with pytest.raises(FacliError, match=r"expected a writable --out file, got .*r.jsonl: Is a "
                                         r"directory; choose another path"):
        ResultWriter(out)
