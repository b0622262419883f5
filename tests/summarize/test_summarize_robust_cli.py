"""facli summarize through the console script, where a newcomer's mistakes land: an --out that
is a device, a pipe, a socket, a folder or '-'; an --out that is someone else's file; a start
that fails; a run where every document fails; progress of documents decoded in rows; and the
decode rate where too few steps ran to measure it. Every run has a timeout: a hang fails."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

FACLI = str(Path(sys.executable).with_name("facli"))
TIMEOUT_S = 300


def summarize(args: list[str], cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    if "stdout" not in kwargs:
        kwargs["capture_output"] = True
    return subprocess.run([FACLI, "summarize", *args], cwd=cwd, text=True, timeout=TIMEOUT_S,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, **kwargs)


def small_docs(root: Path, count: int = 2) -> Path:
    docs = root / "docs"
    docs.mkdir()
    for index in range(count):
        (docs / f"doc{index}.txt").write_text(f"Document {index}: a few words about item {index}.")
    return docs


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def error_line(done: subprocess.CompletedProcess) -> str:
    """The one line a user error prints, and nothing else."""
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("facli: error: expected"), done.stderr
    assert "Traceback" not in done.stderr
    return lines[0]


def side_files(out: str) -> list[str]:
    return [path for path in (f"{out}.lock", f"{out}.manifest.json",
                              str(Path(out).with_suffix(".manifest.json")))
            if os.path.lexists(path)]


@pytest.mark.slow
@pytest.mark.parametrize("out", ["/dev/null", "FIFO", "/dev/full", "/dev/stdout", "-", "SOCKET", "DIR"])
def test_an_out_that_is_no_regular_file_is_refused_up_front(tmp_path, out):
    """Before this, /dev/full read without end, a pipe and /dev/stdout hung, /dev/null ended
    in a traceback and left side files in /dev, and '-' became a file named '-'."""
    docs = small_docs(tmp_path)
    if out == "FIFO":
        out = str(tmp_path / "pipe.jsonl")
        os.mkfifo(out)
    elif out == "SOCKET":
        out = str(tmp_path / "socket.jsonl")
        server = socket.socket(socket.AF_UNIX)
        server.bind(out)
    elif out == "DIR":
        out = str(tmp_path / "folder")
        os.mkdir(out)
    elif not os.path.exists(out) and out != "-":
        pytest.skip(f"no {out} here")
    before = listing(tmp_path)
    line = error_line(summarize([str(docs), "--out", out, "--device", "cpu"], cwd=tmp_path))
    assert out in line
    assert listing(tmp_path) == before and side_files(out) == []


@pytest.mark.slow
def test_dev_stdout_on_a_file_is_refused_too(tmp_path):
    docs = small_docs(tmp_path)
    with open(tmp_path / "stdout.txt", "w") as stdout:
        done = summarize([str(docs), "--out", "/dev/stdout"], cwd=tmp_path, stdout=stdout,
                         stderr=subprocess.PIPE)
    assert error_line(done) == (
        "facli: error: expected --out outside /dev, /proc and /sys, got /dev/stdout (in /dev, "
        "whose entries are system objects); give a path such as results.jsonl")
    assert (tmp_path / "stdout.txt").read_text() == "" and side_files("/dev/stdout") == []


@pytest.mark.slow
def test_someone_elses_file_as_out_is_refused_and_left_as_it_was(tmp_path):
    docs = small_docs(tmp_path)
    notes = tmp_path / "notes.jsonl"
    notes.write_bytes(b'{"name": "not a summary"}\n{"name": "no newline at the end"}')
    before = listing(tmp_path)
    line = error_line(summarize([str(docs), "--out", str(notes), "--device", "cpu"], cwd=tmp_path))
    assert line.startswith("facli: error: expected --out to be a results file of facli summarize")
    assert notes.read_bytes() == b'{"name": "not a summary"}\n{"name": "no newline at the end"}'
    assert listing(tmp_path) == before


@pytest.mark.slow
def test_starts_that_fail_leave_no_side_files(tmp_path):
    """A bad --prompt-template and a model whose weights are cut short: one line each, and no
    output, manifest, lock or folder made for them."""
    docs = small_docs(tmp_path)
    template = tmp_path / "template.txt"
    template.write_text("no placeholder here")
    out = "results/deeper/r.jsonl"
    line = error_line(summarize([str(docs), "--out", out, "--device", "cpu", "--prompt-template",
                                 str(template)], cwd=tmp_path))
    assert "{document} exactly once" in line
    broken = tmp_path / "broken-model"
    from facli.models.resolve import resolve_model

    shutil.copytree(resolve_model(None).path, broken)
    weights = broken / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    done = summarize([str(docs), "--out", out, "--device", "cpu", "--model", str(broken),
                      "--max-new-tokens", "2"], cwd=tmp_path)
    assert done.returncode == 1 and "truncated" in done.stderr.strip().splitlines()[-1]
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "results").exists()
    assert listing(tmp_path) == sorted(["docs", "docs/doc0.txt", "docs/doc1.txt", "template.txt",
                                        *listing_of(broken, tmp_path)])


def listing_of(folder: Path, root: Path) -> list[str]:
    return [str(folder.relative_to(root)), *(str(p.relative_to(root)) for p in folder.rglob("*"))]


@pytest.mark.slow
def test_every_document_failed_exits_1_and_keeps_the_records(tmp_path):
    docs = tmp_path / "bad"
    docs.mkdir()
    (docs / "empty.txt").write_text("")
    (docs / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    args = [str(docs), "--out", "r.jsonl", "--device", "cpu", "--max-new-tokens", "2", "--json"]
    done = summarize(args, cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        'facli: error: expected at least one document summarized, got all 2 failed (the "error" '
        "of each record in r.jsonl says why); fix the cause and rerun with --retry-failed")
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert (summary["done"], summary["failed"], summary["decode_tokens_per_s"]) == (0, 2, None)
    records = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [r["status"] for r in records] == ["failed", "failed"]
    again = summarize(args, cwd=tmp_path)  # nothing left to do: a success
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout.strip().splitlines()[-1])["skipped"] == 2
    (docs / "good.txt").write_text("A document that can be summarized.")
    (docs / "empty.txt").unlink()
    (docs / "also-empty.txt").write_text(" ")
    mixed = summarize(args, cwd=tmp_path)  # one new failure, one success: a success
    assert mixed.returncode == 0, mixed.stderr
    assert json.loads(mixed.stdout.strip().splitlines()[-1])["done"] == 1
    (docs / "empty-again.txt").write_text("")
    later = summarize(args, cwd=tmp_path)  # only a failure now, but a summary from before
    assert later.returncode == 0, later.stderr
    assert json.loads(later.stdout.strip().splitlines()[-1])["failed"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "r.jsonl", "r.manifest.json"]


@pytest.mark.slow
def test_rows_show_progress_in_tokens_as_decode_steps_run(tmp_path):
    """Eight documents in eight rows end together at their last decode step: the progress lines
    before that move with the prefill of each row and then with the decode steps, with a rate
    and the time left; the final line comes once."""
    docs = small_docs(tmp_path, count=8)
    done = summarize([str(docs), "--out", "r.jsonl", "--device", "cpu", "--max-new-tokens", "48",
                      "--batch", "8", "--ctx", "256", "--json"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("summarize: ")]
    pattern = (r"summarize: (\d+)% \| (\d+)/8 documents, 0 failed \| prefill ([\d,]+)/([\d,]+) "
               r"tokens( at [\d,.]+ tok/s)? \| decode ([\d,]+)/([\d,]+) tokens( at [\d,.]+ tok/s)? \| "
               r"[\d.]+ m?s, (time left unknown|about [\d.]+ m?s left)$")
    running = [re.fullmatch(pattern, line) for line in lines[:-1]]
    assert all(running), lines
    decoded = [int(match[6].replace(",", "")) for match in running]
    prefilled = [int(match[3].replace(",", "")) for match in running]
    total = int(running[-1][7].replace(",", ""))
    assert decoded == sorted(decoded) and prefilled == sorted(prefilled)
    assert len([d for d in decoded if 0 < d < total]) >= 3  # moving with the decode steps
    assert all(match[2] == "0" for match in running if 0 < int(match[6].replace(",", "")) < total)
    assert any(match[9].startswith("about") for match in running)
    assert re.fullmatch(r"summarize: 100% \| 8 documents, 0 failed \| prefill [\d,]+ tokens at "
                        r"[\d,.]+ tok/s \| decode [\d,]+ tokens at [\d,.]+ tok/s \| [\d.]+ m?s",
                        lines[-1]), lines[-1]
    assert done.stderr.count(lines[-1]) == 1
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["done"] == 8 and summary["decode_tokens_per_s"] > 0


@pytest.mark.slow
def test_one_decode_step_is_not_a_measured_rate(tmp_path):
    """Two new tokens are one decode step: decode_tokens_per_s is null, not 0.0."""
    docs = small_docs(tmp_path, count=1)
    done = summarize([str(docs), "--out", "r.jsonl", "--device", "cpu", "--max-new-tokens", "2",
                      "--json"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1])["decode_tokens_per_s"] is None
    assert "decode rate not measured (fewer than two decode steps)" in done.stderr
    generate = subprocess.run([FACLI, "generate", "--prompt", "Hello", "--max-new-tokens", "2",
                               "--device", "cpu", "--json"], cwd=tmp_path, capture_output=True,
                              text=True, timeout=TIMEOUT_S)
    assert generate.returncode == 0, generate.stderr
    assert json.loads(generate.stdout.strip().splitlines()[-1])["decode_tokens_per_s"] is None
