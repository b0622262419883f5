"""`facli perplexity` end to end: the figure transformers' model gives for the same windows,
and one-line errors for what it cannot score."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from checkpoints import build_checkpoint
from perplexity_cases import reference_nll

FACLI = str(Path(sys.executable).with_name("facli"))
TEXT = "The tide came in over the flats, and the birds rose together. " * 6


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from facli.models.demo import byte_level_tokenizer

    directory = tmp_path_factory.mktemp("ppl-cli")
    reference = build_checkpoint(directory, "llama", num_key_value_heads=2)
    tokenizer = byte_level_tokenizer()
    tokenizer.save_pretrained(str(directory))
    return directory, reference, tokenizer


def _run(*args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([FACLI, "perplexity", *args], capture_output=True, text=True,
                          timeout=300, env=env, cwd=cwd)


@pytest.mark.slow
def test_matches_transformers(checkpoint, tmp_path):
    directory, reference, tokenizer = checkpoint
    text_file = tmp_path / "text.txt"
    text_file.write_text(TEXT)
    done = _run("--model", str(directory), "--file", str(text_file), "--ctx", "128",
                "--stride", "48", "--device", "cpu", "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    ids = tokenizer(TEXT).input_ids
    nll, count = reference_nll(reference, ids, 128, 48)
    assert result["scored_tokens"] == count == len(ids) - 1
    assert result["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-4)
    assert result["tokens_per_s"] > 0 and result["kv_dtype"] == "fp32"


@pytest.mark.parametrize("args,expected", [
    (["--stride", "0"], "--stride"),
    (["--stride", "500", "--ctx", "64"], "--stride"),
    (["--ctx", "0"], "context length"),
], ids=["stride0", "stride-past-window", "ctx0"])
@pytest.mark.slow
def test_bad_numbers_are_one_line(checkpoint, tmp_path, args, expected):
    directory, _, _ = checkpoint
    text_file = tmp_path / "text.txt"
    text_file.write_text(TEXT)
    done = _run("--model", str(directory), "--file", str(text_file), "--device", "cpu", *args,
                cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr.startswith("facli: error:") and expected in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_missing_folder_and_one_token_files(checkpoint, tmp_path):
    directory, _, _ = checkpoint
    for target, expected in ((tmp_path / "absent.txt", "absent.txt"), (tmp_path, "folder")):
        done = _run("--model", str(directory), "--file", str(target), "--device", "cpu",
                    cwd=tmp_path)
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
        assert expected in done.stderr
    short = tmp_path / "short.txt"
    short.write_text("a")
    done = _run("--model", str(directory), "--file", str(short), "--device", "cpu", cwd=tmp_path)
    assert done.returncode == 1 and "at least 2 tokens" in done.stderr


@pytest.mark.slow
def test_window_longer_than_the_text_is_the_whole_text(checkpoint, tmp_path):
    directory, reference, tokenizer = checkpoint
    text_file = tmp_path / "text.txt"
    text_file.write_text(TEXT)
    done = _run("--model", str(directory), "--file", str(text_file), "--ctx", "4k", "--stride",
                "4096", "--device", "cpu", "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    ids = tokenizer(TEXT).input_ids
    assert (result["windows"], result["ctx"], result["scored_tokens"]) == (1, len(ids), len(ids) - 1)
