"""The GPU benchmark scripts still run: their CPU smoke modes, end to end, on gloo ranks."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.mark.slow
def test_tensor_parallel_smoke_run_measures_every_mode_and_checks_generate(tmp_path):
    env = {**os.environ, "FACLI_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "tensor_parallel.py"), "--smoke", "--devices", "2",
         "--lengths", "128", "--decode-at", "128", "--decode-tokens", "2", "--long", "0", "--reps", "1",
         "--modes", "nocomm,single,tiled,tiled+mlp,nocomm+waves,waves", "--tile", "32", "--projection-tokens", "128",
         "--projection-tiles", "32", "--generate-check", "--out", str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    records = [json.loads(line) for line in (tmp_path / "tensor_parallel.jsonl").read_text().splitlines()]
    prefill_modes = {r["mode"] for r in records if r["kind"] == "prefill" and r["tp"] == 2}
    assert prefill_modes == {"nocomm", "single", "tiled", "tiled+mlp", "nocomm+waves", "waves"}
    assert any(r["kind"] == "prefill" and r["tp"] == 1 for r in records)
    check = [r for r in records if r["kind"] == "generate-check"]
    assert check and check[0]["ok"], check
    assert "| prefill 128 |" in (tmp_path / "tensor_parallel_table.md").read_text()


@pytest.mark.slow
def test_summarize_batched_runs_each_batch_and_the_transformers_baseline(tmp_path):
    tiny = {"model_type": "llama", "vocab_size": 600, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 4096, "bos_token_id": 1, "eos_token_id": 2}
    env = {**os.environ, "FACLI_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "summarize_batched.py"), "--documents", "5",
         "--shortest", "300", "--longest", "400", "--extra-lengths", "900", "--new-tokens", "4", "--batches", "1,2,auto,2:fp8,2:fp8",
         "--transformers-batch", "3", "--corpus", str(tmp_path / "corpus"),
         "--checkpoint", str(tmp_path / "checkpoint"), "--out", str(tmp_path / "out"),
         "--model-config", json.dumps(tiny)],
        env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    found = json.loads((tmp_path / "out" / "summarize_batched.json").read_text())
    assert [run["batch"] for run in found["runs"]] == ["1", "2", "auto", "2:fp8", "2:fp8"]
    assert all(run["summary"]["done"] == 6 for run in found["runs"])
    for run in found["runs"]:  # each run's own plan and forecast, kept for calibration
        assert [line.split(":")[1] for line in run["plan_lines"].splitlines()][:2] == \
            [" plan", " predicted"]
    assert len(found["transformers"]["records"]) == 6
    assert "6 docs, 24 new tokens" in result.stdout
    assert "--batch 2:fp8: facli: 2 rows: 6 prompts" in result.stdout
