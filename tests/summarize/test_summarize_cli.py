"""facli summarize with the embedded demo model on CPU: a mixed folder, resume, retries,
determinism, the manifest, and runs killed with SIGINT and SIGKILL part-way."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from facli.errors import FacliError
from facli.run.sampling import SamplingParams
from facli.summarize.manifest import manifest_path
from facli.summarize.run import run_summarize
from facli.summarize.strategies import Strategy
from summarize_cases import CTX, NEW, mixed_folder, numbered_folder, request, write

FACLI = str(Path(sys.executable).with_name("facli"))


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in out.read_text().splitlines()]


def by_id(out: Path) -> dict[str, dict]:
    found = records(out)
    ids = [r["id"] for r in found]
    assert len(ids) == len(set(ids)), f"duplicated records: {ids}"
    return {r["id"]: r for r in found}


def comparable(rows: dict[str, dict]) -> dict[str, dict]:
    """Records without what differs between equal runs: timings and the folder they ran in."""
    return {key: {k: v for k, v in row.items() if k not in ("seconds", "source")}
            for key, row in rows.items()}


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    docs, out = mixed_folder(root), root / "out" / "results.jsonl"
    summary = run_summarize(request(docs, out))
    return docs, out, summary, by_id(out)


@pytest.fixture(scope="module")
def numbered_reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("numbered")
    out = root / "reference.jsonl"
    run_summarize(request(numbered_folder(root), out))
    return comparable(by_id(out))


def test_mixed_folder_records_every_document(mixed_run):
    _, _, summary, rows = mixed_run
    status = {key.split("#")[0]: row["status"] for key, row in rows.items()}
    assert status == {"docs/a.txt": "ok", "docs/notes/b.md": "ok", "rec-1": "ok",
                      "docs/c.jsonl": "ok", "docs/empty.txt": "failed",
                      "docs/latin1.txt": "failed", "docs/long.txt": "failed"}
    errors = {key.split("#")[0]: row["error"] for key, row in rows.items()}
    assert errors["docs/empty.txt"] == "empty document"
    assert "expected UTF-8" in errors["docs/latin1.txt"]
    assert "at most" in errors["docs/long.txt"] and "--strategy truncate" in errors["docs/long.txt"]
    for row in rows.values():
        assert list(row) == ["id", "source", "summary", "prompt_tokens", "generated_tokens",
                             "seconds", "status", "error"]
        if row["status"] == "ok":
            assert isinstance(row["summary"], str) and 1 <= row["generated_tokens"] <= NEW
            assert row["error"] is None and row["prompt_tokens"] > 0
    assert (summary.done, summary.failed, summary.skipped, summary.interrupted) == (4, 3, 0, False)


def test_manifest_beside_the_output(mixed_run):
    _, out, _, _ = mixed_run
    manifest = json.loads((out.parent / "results.manifest.json").read_text())
    assert manifest["facli_version"]
    assert manifest["model"]["config_hash"].startswith("sha256:")
    assert Path(manifest["model"]["path"], "config.json").is_file()
    assert manifest["settings"]["seed"] == 0 and manifest["settings"]["max_new_tokens"] == NEW
    plan = manifest["plan"]
    assert (plan["documents"], plan["unusable"], plan["fit"], plan["ctx"]) == (7, 2, 4, CTX)
    assert plan["runtime_ctx"] < CTX and plan["memory"]["ctx"] == plan["runtime_ctx"]
    (run,) = manifest["runs"]
    assert run["finished"] and (run["done"], run["failed"], run["strategy"]) == (4, 3, "fit")


def test_rerun_skips_everything_and_other_settings_are_refused(mixed_run):
    docs, out, _, rows = mixed_run
    before = out.read_bytes()
    summary = run_summarize(request(docs, out))
    assert (summary.done, summary.failed, summary.skipped) == (0, 0, 7)
    assert out.read_bytes() == before
    with pytest.raises(FacliError, match="expected the seed of the run that wrote"):
        run_summarize(request(docs, out, sampling=SamplingParams(seed=1)))


def test_fp8_kv_cache_summarizes_and_pins_the_output_to_it(tmp_path):
    """--kv-dtype reaches the plan and the runtime; fp8 summaries are another kind of result, so
    resuming their output without it is refused."""
    docs, out = numbered_folder(tmp_path, count=2), tmp_path / "fp8.jsonl"
    summary = run_summarize(request(docs, out, kv_dtype="fp8", decode_mode="split"))
    assert (summary.done, summary.failed) == (2, 0)
    manifest = json.loads(manifest_path(out).read_text())
    assert manifest["settings"]["kv_dtype"] == "fp8"
    assert manifest["plan"]["memory"]["kv_dtype"] == "fp8"
    with pytest.raises(FacliError, match="expected the kv_dtype of the run that wrote"):
        run_summarize(request(docs, out))
    with pytest.raises(FacliError, match="--decode-mode one of auto, prefetch, cpu, split"):
        request(docs, out, decode_mode="disk")


def test_retry_failed_with_truncate_redoes_only_the_failed(mixed_run, tmp_path):
    docs, out, _, rows = mixed_run
    copy = tmp_path / "results.jsonl"
    copy.write_bytes(out.read_bytes())
    (tmp_path / "results.manifest.json").write_bytes((out.parent / "results.manifest.json").read_bytes())
    summary = run_summarize(request(docs, copy, strategy=Strategy.TRUNCATE, retry_failed=True))
    assert (summary.done, summary.failed, summary.skipped) == (1, 2, 4)
    after = by_id(copy)
    assert after.keys() == rows.keys()
    long_id = next(key for key in rows if key.startswith("docs/long.txt"))
    assert after[long_id]["status"] == "ok" and after[long_id]["prompt_tokens"] == CTX - NEW
    assert {k: v for k, v in after.items() if v["status"] == "ok" and k != long_id} == \
        {k: v for k, v in rows.items() if v["status"] == "ok"}


def test_map_reduce_summarizes_a_document_longer_than_the_context(mixed_run, tmp_path):
    docs, _, _, _ = mixed_run
    out = tmp_path / "r.jsonl"
    run_summarize(request(docs / "long.txt", out, strategy=Strategy.MAP_REDUCE))
    (row,) = records(out)
    assert row["status"] == "ok" and row["prompt_tokens"] > CTX
    assert NEW < row["generated_tokens"] <= 4 * NEW


@pytest.mark.parametrize("sampling", [SamplingParams(), SamplingParams(temperature=1.0, seed=7)])
@pytest.mark.slow
def test_documents_decoded_together_give_the_records_of_one_at_a_time(tmp_path, sampling):
    docs = numbered_folder(tmp_path)
    mixed = mixed_folder(tmp_path)
    found = {}
    for batch in (1, 3, None):  # None: as many as the plan holds (every document)
        out = tmp_path / f"batch-{batch}.jsonl"
        for inputs in (docs, mixed):
            run_summarize(request(inputs, out, sampling=sampling, batch=batch,
                                  strategy=Strategy.MAP_REDUCE))
        found[batch] = comparable(by_id(out))
        runs = json.loads(manifest_path(out).read_text())["runs"]
        # Every first prompt in a row of its own: 8 documents; 4 fitting, 1 long in 3 chunks.
        assert [[group["rows"] for group in run["rows"]] for run in runs] == \
            ([[batch]] * 2 if batch else [[8], [7]])
    assert found[1] == found[3] == found[None]
    assert sum(row["status"] == "ok" for row in found[1].values()) == 8 + 5


@pytest.mark.slow
def test_an_fp8_cache_decodes_documents_together_as_one_at_a_time(tmp_path):
    docs = numbered_folder(tmp_path)
    found = {}
    for batch in (1, 3, None):
        out = tmp_path / f"fp8-{batch}.jsonl"
        run_summarize(request(docs, out, batch=batch, kv_dtype="fp8"))
        found[batch] = comparable(by_id(out))
        (run,) = json.loads(manifest_path(out).read_text())["runs"]
        assert [group["rows"] for group in run["rows"]] == [batch or 8]
    assert found[1] == found[3] == found[None]
    assert all(row["status"] == "ok" for row in found[1].values())


def test_short_documents_run_in_their_own_wider_group(tmp_path, monkeypatch):
    """When the longest document's context holds few rows, the short ones run first in a
    shorter context with more rows; the records are those of one document at a time."""
    docs = numbered_folder(tmp_path)
    write(docs / "zz-long.txt", "A longer document. " * 8)
    import facli.summarize.corpus as corpus_module

    monkeypatch.setattr(corpus_module, "choose_rows",
                        lambda config, ctx, hardware, **_: 64 if ctx <= 128 else 1)
    grouped, alone = tmp_path / "grouped.jsonl", tmp_path / "alone.jsonl"
    run_summarize(request(docs, grouped))
    run_summarize(request(docs, alone, batch=1))
    (run,) = json.loads(manifest_path(grouped).read_text())["runs"]
    assert [(g["ctx"], g["rows"], g["documents"]) for g in run["rows"]] == \
        [(128, 8, 8), (run["rows"][1]["ctx"], 1, 1)]
    assert 128 < run["rows"][1]["ctx"] <= CTX
    assert comparable(by_id(grouped)) == comparable(by_id(alone))


def test_rows_the_runtime_cannot_keep_on_the_device_fall_back_to_one(tmp_path, monkeypatch,
                                                                     numbered_reference, capfd):
    """The runtime ranks placements its own way: should its plan for the chosen rows keep part
    of the cache off the device, the group runs one document at a time instead."""
    import facli.run.runtime as runtime_module

    real = runtime_module.build_kv_store

    def one_row_only(plan, *args):
        if plan.batch > 1:
            raise FacliError(f"expected the KV cache of batch {plan.batch} to fit (test)")
        return real(plan, *args)

    monkeypatch.setattr(runtime_module, "build_kv_store", one_row_only)
    out = tmp_path / "r.jsonl"
    run_summarize(request(numbered_folder(tmp_path), out))
    assert "(test); running these 8 documents one at a time" in capfd.readouterr().err
    assert comparable(by_id(out)) == numbered_reference
    with pytest.raises(FacliError, match=r"batch 3 to fit \(test\)"):  # --batch as asked
        run_summarize(request(numbered_folder(tmp_path), tmp_path / "asked.jsonl", batch=3))


@pytest.mark.slow
def test_two_ranks_decode_rows_together_as_one_process_does(tmp_path, numbered_reference):
    docs, out = numbered_folder(tmp_path), tmp_path / "r.jsonl"
    command = [FACLI, "summarize", str(docs), "--out", str(out), "--ctx", str(CTX),
               "--max-new-tokens", str(NEW), "--device", "cpu", "--devices", "2", "--json"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    assert "8 documents in 8 rows of 109 tokens" in done.stderr
    assert comparable(by_id(out)) == numbered_reference


def test_sampled_summaries_are_deterministic_for_a_fixed_seed(mixed_run, tmp_path):
    docs = mixed_run[0]
    summaries = []
    for name, seed in (("first", 7), ("second", 7), ("other", 8)):
        out = tmp_path / f"{name}.jsonl"
        sampling = SamplingParams(temperature=1.0, seed=seed)
        run_summarize(request(docs / "a.txt", out, sampling=sampling, max_new_tokens=8))
        summaries.append(records(out)[0]["summary"])
    assert summaries[0] == summaries[1] != summaries[2]


def start(docs: Path, out: Path, stderr: Path, batch: int = 2) -> subprocess.Popen:
    """A summarize process of `batch` rows: fewer than the documents, so that some are still to
    start when it is stopped."""
    command = [FACLI, "summarize", str(docs), "--out", str(out), "--ctx", str(CTX),
               "--max-new-tokens", str(NEW), "--device", "cpu", "--batch", str(batch), "--json"]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr.open("wb"),
                            text=True, start_new_session=True)


def wait_for_lines(out: Path, count: int, process: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if out.exists() and out.read_bytes().count(b"\n") >= count:
            return
        assert process.poll() is None, "facli exited before writing its first records"
        time.sleep(0.02)
    raise AssertionError(f"no {count} records in {out} after {timeout} s")


def finish(docs: Path, out: Path, stderr: Path) -> dict:
    process = start(docs, out, stderr)
    stdout, _ = process.communicate(timeout=300)
    assert process.returncode == 0, stderr.read_text()
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.slow
def test_sigint_saves_what_is_done_and_the_rerun_completes(tmp_path, numbered_reference, batch):
    docs, out, log = numbered_folder(tmp_path), tmp_path / "r.jsonl", tmp_path / "stderr.txt"
    process = start(docs, out, log, batch)
    wait_for_lines(out, 1, process)
    process.send_signal(signal.SIGINT)
    stdout, _ = process.communicate(timeout=120)
    assert process.returncode == 130, log.read_text()
    assert "stopping after the documents in progress" in log.read_text()
    assert "Traceback" not in log.read_text()
    interrupted = json.loads(stdout.strip().splitlines()[-1])
    saved = by_id(out)
    assert interrupted["interrupted"] and interrupted["done"] == len(saved) < len(numbered_reference)
    summary = finish(docs, out, log)
    assert summary["skipped"] == len(saved) and summary["done"] == len(numbered_reference) - len(saved)
    assert comparable(by_id(out)) == numbered_reference


@pytest.mark.slow
def test_sigkill_and_a_torn_last_line_then_the_rerun_completes(tmp_path, numbered_reference, capfd):
    docs, out, log = numbered_folder(tmp_path), tmp_path / "r.jsonl", tmp_path / "stderr.txt"
    process = start(docs, out, log)
    wait_for_lines(out, 2, process)
    os.kill(process.pid, signal.SIGKILL)
    process.communicate(timeout=60)
    saved = len(by_id(out))
    assert 2 <= saved < len(numbered_reference)
    with out.open("ab") as handle:  # what a crash in the middle of a write leaves
        handle.write(b'{"id": "many/doc07.txt#0", "source": "many/doc0')
    summary = run_summarize(request(docs, out))
    assert "dropped a partial last line" in capfd.readouterr().err
    assert summary.skipped == saved and summary.done == len(numbered_reference) - saved
    assert comparable(by_id(out)) == numbered_reference
    assert out.read_bytes().endswith(b"\n")


def test_cli_user_error_is_one_line_and_usage_error_exits_2(tmp_path):
    from typer.testing import CliRunner

    from facli.cli import app

    runner = CliRunner()
    missing = runner.invoke(app, ["summarize", str(tmp_path / "nope"), "--out", str(tmp_path / "r.jsonl")])
    assert missing.exit_code == 1 and missing.stdout == ""
    assert missing.stderr.strip().splitlines() == [
        f"facli: error: expected an existing file or directory, got '{tmp_path / 'nope'}'; check the path"]
    usage = runner.invoke(app, ["summarize", str(tmp_path), "--out", "r.jsonl", "--strategy", "all"])
    assert usage.exit_code == 2 and "'all' is not one of" in usage.stderr
    rows = runner.invoke(app, ["summarize", str(tmp_path), "--out", "r.jsonl", "--batch", "0"])
    assert rows.exit_code == 1 and rows.stderr.strip().splitlines() == [
        "facli: error: expected --batch a number from 1 to 2147483648, or auto, got '0'"]


def test_rows_that_cannot_stay_on_the_gpus_are_refused_in_one_line():
    """Rows decode together only from a cache wholly on the devices, in the weights' dtype or
    fp8: two rows of 128K keep four layers' KV in host memory."""
    from facli.offload.build import build_kv_store
    from facli.planner.hardware import load_hardware
    from facli.planner.search import PlanOptions, plan
    from facli.models.recipe_loader import load_model_recipe

    config = load_model_recipe("llama-7b").config
    h200 = load_hardware("1xH200-141GB")
    offloaded = plan(config, h200, 128 * 1024, 2, PlanOptions())
    assert offloaded.host.layers
    with pytest.raises(FacliError, match=r"^expected the KV cache of batch 2 at ctx 131072 to stay "
                                         r"wholly on the GPUs \(decoding rows together needs that\), "
                                         r"got a plan with decode mode split and KV dtype fp16; lower "
                                         r"--batch or --ctx$"):
        build_kv_store(offloaded, config, 1, torch.device("cpu"))
