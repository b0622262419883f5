"""generate's inputs: a --prompt-file that is no readable file says what it is, and its read is
bounded; a huge --max-new-tokens names itself and the model's context, not --ctx; a plan that
does not fit points at plan-memory's --hardware instead of offering an option generate lacks."""

import json
import os
import shutil
from pathlib import Path

import pytest

from checkpoints import build_checkpoint
from cli_errors import error_line, invoke
from facli.models.demo import byte_level_tokenizer


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A small llama checkpoint (max_position_embeddings 2048) with byte-level tokenizer files."""
    directory = tmp_path_factory.mktemp("checkpoint")
    build_checkpoint(directory, "llama")
    byte_level_tokenizer().save_pretrained(str(directory))
    return directory


def generate(*args, model=None, env=None, input=None):
    head = ["generate", "--device", "cpu", "--max-new-tokens", "2"]
    return invoke(head + (["--model", model] if model else []) + list(args), env=env, input=input)


@pytest.fixture()
def cache(tmp_path):
    """An empty FACLI_CACHE: a refused prompt never gets as far as the demo model."""
    return {"FACLI_CACHE": str(tmp_path / "cache")}


def test_a_folder_as_prompt_file_is_named_a_folder(tmp_path, cache):
    line = error_line(generate("--prompt-file", tmp_path, env=cache),
                      f"expected --prompt-file to be a regular file, got {tmp_path}: a directory")
    assert "does not exist" not in line


def test_a_missing_prompt_file_is_named_missing(tmp_path, cache):
    error_line(generate("--prompt-file", tmp_path / "absent.txt", env=cache),
               "expected a readable --prompt-file", "No such file or directory")


@pytest.mark.skipif(not Path("/proc/self/mem").exists(), reason="needs Linux's /proc")
def test_an_unreadable_prompt_file_says_so(cache):
    """/proc/self/mem opens but reads fail at offset 0, for root too."""
    error_line(generate("--prompt-file", "/proc/self/mem", env=cache),
               "expected a readable --prompt-file, got /proc/self/mem")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads through file permissions")
def test_a_prompt_file_without_read_permission_says_so(tmp_path, cache):
    prompt = tmp_path / "secret.txt"
    prompt.write_text("hello")
    prompt.chmod(0)
    error_line(generate("--prompt-file", prompt, env=cache), "readable --prompt-file",
               "ermission denied")


def test_a_device_as_prompt_file_is_not_read(cache):
    error_line(generate("--prompt-file", "/dev/zero", env=cache),
               "got /dev/zero: a character device")


def test_a_huge_prompt_file_is_refused_unread(tmp_path, cache):
    prompt = tmp_path / "huge.txt"
    with open(prompt, "wb") as handle:
        handle.truncate(1 << 30)
    error_line(generate("--prompt-file", prompt, env=cache),
               "expected --prompt-file of at most 64.0 MiB", "1.0 GiB")


def test_standard_input_is_read_with_a_bound(cache, monkeypatch):
    monkeypatch.setattr("facli.prompt_text.DOCUMENT_LIMIT", 16)
    error_line(generate("--prompt-file", "-", env=cache, input="x" * 17),
               "expected a prompt of at most 16 B on standard input")


def test_a_huge_max_new_tokens_names_itself_and_the_models_context(checkpoint):
    line = error_line(generate("--prompt", "hi", "--max-new-tokens", str(10**9), model=checkpoint),
                      "--max-new-tokens (1000000000)", "max_position_embeddings (2048 tokens)",
                      "lower --max-new-tokens to at most 2046", "--allow-ctx-extension")
    assert "--ctx" not in line


def test_past_the_trained_length_max_new_tokens_meets_facli_largest_context(checkpoint):
    line = error_line(generate("--prompt", "hi", "--max-new-tokens", str(10**9),
                               "--allow-ctx-extension", model=checkpoint),
                      "--max-new-tokens (1000000000)", "facli's largest context, 16m",
                      "at most 16777214")
    assert "--ctx" not in line


def test_a_sliding_window_bounds_the_new_tokens(checkpoint, tmp_path):
    model = tmp_path / "mistral"
    shutil.copytree(checkpoint, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "model_type": "mistral",
                                                   "sliding_window": 64}))
    error_line(generate("--prompt", "hi", "--max-new-tokens", "100", model=model),
               "the model's sliding_window (64 tokens)", "lower --max-new-tokens to at most 62")


def test_with_ctx_given_a_huge_max_new_tokens_stops_at_the_context(checkpoint):
    result = generate("--prompt", "hi", "--ctx", "6", "--max-new-tokens", str(10**9), "--json",
                      model=checkpoint)
    assert result.exit_code == 0, result.stderr
    payload = json.loads(result.stdout.splitlines()[-1])
    # The last token is never fed back, so it needs no place in the cache.
    assert payload["finish_reason"] in ("length", "eos")
    assert payload["prompt_tokens"] + len(payload["token_ids"]) <= 6 + 1


def test_a_plan_that_does_not_fit_names_hardware_only_as_plan_memorys(checkpoint, tmp_path):
    """256 layers at 16m tokens need terabytes of KV: no machine's host memory holds them. The
    plan is refused before any weight is read, so the checkpoint needs none of those layers."""
    model = tmp_path / "deep"
    shutil.copytree(checkpoint, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 256}))
    line = error_line(generate("--prompt", "hi", "--ctx", "16m", "--allow-ctx-extension",
                               model=model), "to fit on", "lower --ctx", alone=False)
    assert "`facli plan-memory --hardware NAME`" in line
    assert "--hardware" not in line.replace("facli plan-memory --hardware", "")
    assert "--batch" not in line  # generate has no --batch; with one row there is nothing to lower


def test_plan_memory_keeps_naming_its_own_options():
    line = error_line(invoke(["plan-memory", "--model", "llama-7b", "--hardware", "1xA100-80GB",
                              "--ctx", "1m", "--batch", "2"]), "to fit on 1xA100-80GB",
                      alone=False)
    assert "lower --ctx or --batch" in line and "facli plan-memory --hardware NAME" in line
