"""The GPU benchmark scripts still run: their CPU smoke modes, end to end, on gloo ranks."""

import json
import os
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


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
