"""benchmarks/cpu_vs_transformers.py end to end on a tiny checkpoint: both sides run at every depth
and generate the same greedy tokens."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from checkpoints import build_checkpoint

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "cpu_vs_transformers.py"


@pytest.mark.slow
def test_benchmark_runs_both_sides_at_every_depth(tmp_path):
    from facli.models.demo import byte_level_tokenizer

    checkpoint = tmp_path / "tiny"
    build_checkpoint(checkpoint, "llama", num_attention_heads=6, num_key_value_heads=2,
                     hidden_size=96, vocab_size=384)
    byte_level_tokenizer().save_pretrained(str(checkpoint))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-P", str(SCRIPT), "--checkpoint", str(checkpoint), "--depths", "40,97",
         "--decode-tokens", "5", "--repeats", "2", "--threads", "1", "--out", str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "cpu_vs_transformers.json").read_text())
    assert report["env"]["threads"] == 1 and report["env"]["dtype"] == "fp32"
    assert [row["prompt_tokens"] for row in report["rows"]] == [40, 97]
    for row in report["rows"]:
        assert row["first_token_difference"] is None
        for side in ("facli", "transformers"):
            assert len(row[side]["runs"]) == 2
            assert row[side]["ttft_s"] > 0 and row[side]["decode_tokens_per_s"] > 0
    table = result.stdout.splitlines()
    assert any(line.split("|")[0].strip() == "97" and line.endswith("| same") for line in table)
