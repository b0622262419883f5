"""Every number a user passes is checked once, where the core type is built: non-finite or
out-of-range values are one `facli: error:` line naming the option, never a traceback."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cli_errors import error_line, invoke
from facli.errors import FacliError
from facli.planner.search import PlanOptions
from facli.run.sampling import Sampler, SamplingParams
from facli.run_options import RunOptions
from facli.units import MAX_CTX, parse_batch, parse_ctx

GENERATE = ["generate", "--prompt", "hello", "--device", "cpu", "--max-new-tokens", "2"]


@pytest.fixture()
def cache(tmp_path):
    """An empty FACLI_CACHE: none of these runs may get as far as writing the demo model."""
    return {"FACLI_CACHE": str(tmp_path / "cache")}


GENERATE_CASES = [
    ("--temperature", "nan", "finite number in [0, inf)"),
    ("--temperature", "inf", "finite number in [0, inf)"),
    ("--temperature", "-inf", "got -inf"),
    ("--temperature", "-0.5", "got -0.5"),
    ("--top-p", "nan", "finite number in (0, 1]"),
    ("--top-p", "0", "got 0.0"),
    ("--top-p", "1.5", "got 1.5"),
    ("--top-p", "inf", "got inf"),
    ("--top-k", "-1", "from 0 to"),
    ("--seed", "-1", "from 0 to 18446744073709551615"),
    ("--seed", str(2**64), f"got {2**64}"),
    ("--prefill-chunk", "0", "from 1 to"),
    ("--prefill-chunk", str(2**40), f"got {2**40}"),
    ("--allreduce-tile-tokens", "0", "from 1 to"),
    ("--ctx", "17m", "at most 16m"),
    ("--ctx", "0", "positive context length"),
    ("--max-new-tokens", "0", "> 0"),
]


@pytest.mark.parametrize(("option", "value", "words"), GENERATE_CASES,
                         ids=[f"{option}={value[:12]}" for option, value, _ in GENERATE_CASES])
def test_generate_refuses_bad_numbers(cache, option, value, words):
    result = invoke(GENERATE + [option, value], env=cache)
    error_line(result, option if option != "--ctx" else "context length", words)
    assert not Path(cache["FACLI_CACHE"]).exists()  # refused before the model was looked at


PLAN_CASES = [
    (["--margin", "nan"], ["--margin such as 2GiB"]),
    (["--margin", "inf"], ["--margin such as 2GiB"]),
    (["--margin", "9" * 400], ["--margin below the 80.0 GiB", "999..."]),
    (["--margin", "81GiB"], ["--margin below the 80.0 GiB of memory", "got 81GiB"]),
    (["--margin", "100%"], ["--margin below 100%"]),
    (["--batch", "0"], ["--batch a number from 1"]),
    (["--batch", str(2**40)], ["--batch a number from 1"]),
    (["--batch", "nan"], ["--batch"]),
    (["--ctx", "99999999k"], ["at most 16m"]),
    (["--prefill-chunk", "0"], ["--prefill-chunk a whole number from 1"]),
    (["--allreduce-tile-tokens", str(2**40)], ["--allreduce-tile-tokens a whole number from 1"]),
]


@pytest.mark.parametrize(("args", "words"), PLAN_CASES,
                         ids=[f"{args[0]}={args[1][:12]}" for args, _ in PLAN_CASES])
def test_plan_memory_refuses_bad_numbers(args, words):
    result = invoke(["plan-memory", "--model", "llama-7b", "--hardware", "1xA100-80GB", *args])
    error_line(result, *words)


@pytest.mark.parametrize(("option", "value"), [("--temperature", "inf"), ("--top-p", "nan"),
                                               ("--seed", "-3")])
def test_summarize_refuses_bad_sampling_numbers(tmp_path, cache, option, value):
    (tmp_path / "doc.txt").write_text("a document")
    result = invoke(["summarize", tmp_path / "doc.txt", "--out", tmp_path / "out.jsonl",
                     "--device", "cpu", option, value], env=cache)
    error_line(result, option)
    assert not (tmp_path / "out.jsonl").exists()


def test_bench_refuses_a_depth_past_the_largest_context(cache):
    error_line(invoke(["bench", "--device", "cpu", "--depth", "8k,32m", "--baseline", "none"],
                      env=cache), "at most 16m", "'32m'")


def test_non_numbers_stay_usage_errors_of_the_option_parser(cache):
    """typer refuses what is not a number at all (exit code 2, usage); the range checks above
    cover what it lets through (nan, inf, negative and huge values)."""
    result = invoke(GENERATE + ["--top-k", "1.5"], env=cache)
    assert result.exit_code == 2 and "--top-k" in result.stderr
    assert isinstance(result.exception, SystemExit)


def test_core_types_check_their_numbers():
    with pytest.raises(FacliError, match="--ctx a whole number from 0 to"):
        RunOptions(ctx=MAX_CTX + 1)
    with pytest.raises(FacliError, match="--batch a whole number"):
        RunOptions(batch=True)
    with pytest.raises(FacliError, match="--devices a whole number from 1"):
        PlanOptions(devices=0)
    with pytest.raises(FacliError, match="--max-new-tokens a whole number from 0"):
        PlanOptions(new_tokens=-1)
    with pytest.raises(FacliError, match="--temperature"):
        SamplingParams(temperature=math.nan)
    assert parse_ctx("16m") == MAX_CTX and parse_batch("auto") is None
    with pytest.raises(FacliError, match="at most 16m"):
        parse_ctx(MAX_CTX + 1)


def test_a_tiny_temperature_samples_the_most_likely_token():
    """(logits / 1e-30) overflows to inf, whose softmax is nan; sampling shifts the largest
    logit to 0 first, so a tiny temperature is greedy in effect."""
    logits = torch.tensor([[1.0, 3.0, 2.0], [0.5, -1.0, 0.25]])
    sampler = Sampler(SamplingParams(temperature=1e-30, seed=2**64 - 1), torch.device("cpu"))
    for _ in range(5):
        assert sampler(logits).tolist() == [1, 0]


@pytest.mark.slow
def test_console_script_prints_one_line_for_a_nan_temperature(tmp_path):
    facli = str(Path(sys.executable).with_name("facli"))
    env = {**os.environ, "FACLI_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([facli, *GENERATE, "--temperature", "nan"], capture_output=True,
                          text=True, timeout=120, env=env, cwd=tmp_path)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        "facli: error: expected --temperature a finite number in [0, inf) (0 is greedy), got nan"]


@pytest.mark.parametrize("name", ["", "  "], ids=["empty", "blank"])
def test_a_blank_hardware_name_lists_the_recipes(name):
    error_line(invoke(["plan-memory", "--hardware", name]),
               "expected --hardware auto or a hardware recipe name, one of 1xA100-80GB")
