"""`facli bench` end to end on the CPU with the demo model, against transformers."""

import importlib.util
import inspect
import json
import os
import subprocess
import sys
import time

import pytest

FACLI = [sys.executable, "-P", "-m", "facli.cli", "bench"]  # -P: the repo root stays off sys.path
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return {**os.environ, "FACLI_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}


def bench(args, env):
    return subprocess.run(FACLI + args, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def demo_run(env, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "out.json"
    result = bench(["--depth", "64,128", "--decode-tokens", "4", "--device", "cpu",
                    "--baseline", "transformers", "--json", "--json-out", str(out)], env)
    assert result.returncode == 0, result.stderr
    return result, out


@pytest.mark.slow
def test_json_file_and_last_line_hold_every_figure(demo_run):
    result, out = demo_run
    report = json.loads(out.read_text())
    assert json.loads(result.stdout.strip().splitlines()[-1]) == report
    assert report["schema"] == "facli.bench/1"
    env = report["environment"]
    for key in ("device", "gpus", "torch", "cuda", "triton", "transformers", "python", "commit", "date_utc"):
        assert key in env
    assert env["device"] == "cpu" and env["gpus"] == []
    assert report["request"]["depths"] == [64, 128]
    for side in ("facli", "transformers"):
        depths = report[side]["depths"]
        assert [d["depth"] for d in depths] == [64, 128]
        for record in depths:
            assert record["status"] == "ok", record
            assert record["prompt_tokens"] == record["depth"] - 4 - 8
            assert record["new_tokens"] == 4
            assert record["ttft_s"] > 0 and record["decode_tokens_per_s"] > 0
            assert record["prefill_tokens_per_s"] == pytest.approx(record["prompt_tokens"] / record["ttft_s"])
    facli = report["facli"]
    assert facli["model"] == "random-demo" and facli["dtype"] == "float32"
    assert "prompt_ids" not in facli
    assert facli["decode_bytes"]["weights_per_rank"] > 0
    assert report["largest_context"] == {"facli": 128, "transformers": 128, "ratio": 1.0}
    assert [c["depth"] for c in report["comparison"]] == [64, 128]
    assert all(c["decode_tokens_per_s"] > 0 for c in report["comparison"])


@pytest.mark.slow
def test_table_on_stdout_and_progress_on_stderr(demo_run):
    result, _ = demo_run
    lines = result.stdout.splitlines()
    assert lines[0].startswith("random-demo float32 on 1 x CPU")
    header = next(line for line in lines if line.startswith("| depth | prompt tok |"))
    assert "HF decode tok/s" in header and "decode x" in header
    assert any(line.startswith("| 64 | 52 |") for line in lines)
    assert any(line.startswith("| 128 | 116 |") for line in lines)
    assert "Largest context reached: facli 128, transformers 128 (1.0x)" in lines
    assert "facli bench: depth 128: facli TTFT" in result.stderr
    assert "facli bench: depth 128: transformers TTFT" in result.stderr


def run_in_process(args):
    from typer.testing import CliRunner

    from facli.cli import app

    # stdout and stderr apart: the default from click 8.2 on, an argument before it.
    apart = "mix_stderr" in inspect.signature(CliRunner.__init__).parameters
    return CliRunner(**({"mix_stderr": False} if apart else {})).invoke(app, ["bench", *args])


def bench_without_baseline(args, env, out):
    """(completed process, JSON report) of a CPU bench of the demo model, 4 decode tokens."""
    result = bench([*args, "--decode-tokens", "4", "--device", "cpu", "--baseline", "none",
                    "--json-out", str(out)], env)
    assert result.returncode == 0, result.stderr
    return result, json.loads(out.read_text())


@pytest.mark.slow
def test_fp8_kv_cache_is_planned_run_and_labelled(env, tmp_path):
    result, report = bench_without_baseline(["--depth", "128", "--kv-dtype", "fp8"], env,
                                            tmp_path / "fp8.json")
    assert report["request"]["kv_dtype"] == "fp8"
    assert report["facli"]["depths"][0]["plan"]["kv_dtype"] == "fp8"
    assert "fp8 KV cache" in result.stdout.splitlines()[0]


@pytest.mark.slow
def test_rows_decode_together_next_to_transformers_in_one_batch(env, tmp_path):
    out = tmp_path / "rows.json"
    result = bench(["--depth", "128", "--decode-tokens", "4", "--device", "cpu", "--batch", "3",
                    "--json-out", str(out)], env)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    (facli,), (hf,) = report["facli"]["depths"], report["transformers"]["depths"]
    assert facli["status"] == hf["status"] == "ok" and facli["rows"] == hf["rows"] == 3
    for record in (facli, hf):
        assert record["new_tokens"] == 4 and record["decode_tokens_per_s"] > 0
        assert record["prefill_tokens_per_s"] == pytest.approx(3 * 116 / record["ttft_s"])
    assert facli["plan"]["plan"]["batch"] == 3
    # The plan's rate counts every row's prompt, as the measured one does.
    plan = facli["plan"]
    assert plan["prefill_tokens_per_s"] == pytest.approx(
        3 * plan["plan"]["ctx"] / plan["plan"]["timing"]["prefill_s"])
    sizes = report["facli"]["decode_bytes"]
    kv_per_token = sizes["kv_elements_per_token_per_rank"] * sizes["kv_element_bytes"]
    # One step reads the weights once and each of the 3 rows' KV, at the mean decode length.
    assert facli["bandwidth"]["bytes_per_step_per_rank"] == \
        int(sizes["weights_per_rank"] + 3 * kv_per_token * (116 + 4 / 2))
    assert "3 rows decoded together" in result.stdout.splitlines()[0]
    assert "facli bench: depth 128 (3 rows): facli TTFT" in result.stderr


@pytest.mark.slow
def test_auto_rows_are_the_most_that_keep_the_cache_on_the_device(env, tmp_path):
    """--batch auto: at each depth the runtime's resident_rows, capped at 64; transformers
    generates the same number at once."""
    result, report = bench_without_baseline(["--depth", "96,160", "--batch", "auto"], env,
                                            tmp_path / "auto.json")
    for record in report["facli"]["depths"]:
        assert record["status"] == "ok" and record["plan"]["plan"]["batch"] == record["rows"]
        assert 1 < record["rows"] <= 64
    lines = result.stdout.splitlines()
    assert "as many rows as keep the cache on the devices decoded together" in lines[0]
    header = next(line for line in lines if line.startswith("| depth |"))
    assert header.startswith("| depth | rows | prompt tok |")


@pytest.mark.slow
def test_ctx_plans_every_depth_for_the_larger_context(env, tmp_path):
    result, report = bench_without_baseline(["--depth", "64,128", "--ctx", "512"], env,
                                            tmp_path / "ctx.json")
    assert report["request"]["ctx"] == 512
    for record in report["facli"]["depths"]:
        plan = record["plan"]
        assert plan["plan"]["ctx"] == 512 and record["status"] == "ok"
        # The prompt's own predictions, the context's kept beside them.
        assert plan["ctx_ttft_s"] > plan["ttft_s"] > 0
        assert plan["prefill_tokens_per_s"] == pytest.approx(record["prompt_tokens"] / plan["ttft_s"])
    assert "planned for 512 at every depth" in result.stdout.splitlines()[0]


@pytest.mark.slow
def test_repeats_take_the_median_of_rounds_of_both_sides(env, tmp_path):
    out = tmp_path / "rounds.json"
    result = bench(["--depth", "64", "--decode-tokens", "4", "--device", "cpu", "--repeats", "3",
                    "--json-out", str(out)], env)
    assert result.returncode == 0, result.stderr
    assert "; medians of 3 rounds, facli and transformers going first in turn;" in result.stdout.splitlines()[0]
    sides = [line.split(": ")[2].split()[0] for line in result.stderr.splitlines()
             if line.startswith("facli bench: depth 64: ")]
    assert sides == ["facli", "transformers", "transformers", "facli", "facli", "transformers"]
    report = json.loads(out.read_text())
    for side in ("facli", "transformers"):
        record = report[side]["depths"][0]
        for key in ("ttft_s", "prefill_tokens_per_s", "decode_tokens_per_s"):
            values = record["rounds"][key]
            assert len(values) == 3 and record[key] == sorted(values)[1]
    assert report["comparison"][0]["ttft"] == pytest.approx(
        report["transformers"]["depths"][0]["ttft_s"] / report["facli"]["depths"][0]["ttft_s"])


def test_median_of_rounds_skips_failed_rounds_and_keeps_one_round_as_it_is():
    from facli.bench.run import median_of_rounds

    def result(*ttfts):
        return {"model": "m", "depths": [
            {"depth": 64, "status": "ok" if t else "out of memory", "ttft_s": t,
             "prefill_tokens_per_s": 64 / t if t else None, "decode_tokens_per_s": None}
            for t in ttfts]}

    one = result(2.0)
    assert median_of_rounds([one]) == one
    combined = median_of_rounds([result(3.0), result(None), result(1.0), result(2.0)])
    record = combined["depths"][0]
    assert record["ttft_s"] == 2.0 and record["prefill_tokens_per_s"] == pytest.approx(32.0)
    assert record["decode_tokens_per_s"] is None  # no round measured it
    assert record["rounds"]["ttft_s"] == [3.0, None, 1.0, 2.0]


def test_user_errors_are_one_line():
    result = run_in_process(["--depth", "8k,lots", "--device", "cpu"])
    assert result.exit_code == 1
    assert result.stderr.strip() == "facli: error: expected a context length such as 4096, 32k, 256k or 1m, got 'lots'"
    result = run_in_process(["--depth", "16", "--device", "cpu"])
    assert result.exit_code == 1 and "expected every --depth >= 73" in result.stderr
    result = run_in_process(["--depth", "128", "--device", "cpu", "--batch", "0"])
    assert result.exit_code == 1
    assert result.stderr.strip() == ("facli: error: expected --batch a number from 1 to 2147483648, "
                                     "or auto, got '0'")
    result = run_in_process(["--depth", "128", "--device", "cpu", "--repeats", "0"])
    assert result.exit_code == 1
    assert result.stderr.strip() == "facli: error: expected --repeats >= 1, got 0"
    result = run_in_process(["--depth", "128", "--device", "cpu", "--batch", "many"])
    assert result.exit_code == 1
    assert result.stderr.strip() == ("facli: error: expected --batch a number from 1 to 2147483648, "
                                     "or auto, got 'many'")


@pytest.mark.skipif(HAS_MATPLOTLIB, reason="checks the message shown without matplotlib")
def test_plot_without_matplotlib_says_so(tmp_path):
    result = run_in_process(["--depth", "64", "--decode-tokens", "4", "--device", "cpu", "--plot",
                             str(tmp_path / "p.png")])
    assert result.exit_code == 1
    assert "expected matplotlib for --plot" in result.stderr


@pytest.mark.slow
@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="needs matplotlib")
def test_plot_is_a_png(env, tmp_path):
    plot = tmp_path / "p.png"
    result = bench(["--depth", "64,128", "--decode-tokens", "4", "--device", "cpu", "--baseline",
                    "none", "--plot", str(plot)], env)
    assert result.returncode == 0, result.stderr
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(("where", "reason"), [
    ("folder", "it is a folder"),
    ("missing/out.json", "folder {tmp}/missing does not exist"),
    ("file/out.json", "{tmp}/file is not a folder"),
    ("/dev/null", "it is not a regular file"),
], ids=["folder", "missing-folder", "under-a-file", "device"])
@pytest.mark.parametrize("option", ["--json-out", "--plot"])
def test_an_output_path_that_cannot_be_written_is_refused_before_the_run(tmp_path, where, reason,
                                                                          option):
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("")
    path = where if where.startswith("/") else str(tmp_path / where)
    started = time.perf_counter()
    result = run_in_process(["--depth", "64", "--decode-tokens", "4", "--device", "cpu", option, path])
    assert result.exit_code == 1
    assert result.stderr == (f"facli: error: expected {option} to name a writable file, got {path}: "
                             f"{reason.format(tmp=tmp_path)}; choose another path\n")
    assert result.stdout == "" and time.perf_counter() - started < 5  # nothing was measured


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_an_unwritable_folder_is_refused_before_the_run(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    result = run_in_process(["--depth", "64", "--device", "cpu", "--json-out", str(locked / "o.json")])
    assert result.exit_code == 1 and f"permission denied in {locked}" in result.stderr


@pytest.mark.slow
def test_devices_auto_is_one_rank_on_the_cpu(env):
    result = bench(["--depth", "64", "--decode-tokens", "4", "--device", "cpu", "--devices", "auto",
                    "--baseline", "none", "--json"], env)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["request"]["devices"] == 1 and report["facli"]["depths"][0]["status"] == "ok"
    wrong = run_in_process(["--depth", "64", "--device", "cpu", "--devices", "two"])
    assert wrong.exit_code == 1
    assert wrong.stderr == ("facli: error: expected --devices a number from 1 to 2147483648, or "
                            "auto, got 'two'\n")


@pytest.mark.slow
def test_two_gloo_ranks(env):
    result = bench(["--depth", "64", "--decode-tokens", "4", "--device", "cpu", "--devices", "2",
                    "--baseline", "none"], env)
    assert result.returncode == 0, result.stderr
    assert any(line.startswith("| 64 | 52 |") for line in result.stdout.splitlines())
    assert "2 x CPU" in result.stdout.splitlines()[0]


@pytest.mark.slow
def test_two_gloo_ranks_decode_rows_together(env, tmp_path):
    result = bench(["--depth", "64", "--decode-tokens", "4", "--device", "cpu", "--devices", "2",
                    "--batch", "auto", "--baseline", "none", "--json"], env)
    assert result.returncode == 0, result.stderr
    (record,) = json.loads(result.stdout.strip().splitlines()[-1])["facli"]["depths"]
    assert record["status"] == "ok" and record["rows"] > 1 and record["new_tokens"] == 4


@pytest.mark.slow
def test_synthetic_weights_on_both_sides(monkeypatch):
    """--synthetic: facli fills random weights itself, transformers builds the shape from config."""
    import facli.bench.request
    from facli.bench.request import BenchRequest
    from facli.bench.run import run_bench
    from facli.models.demo import demo_config
    from facli.models.resolve import ResolvedModel

    monkeypatch.setattr(facli.bench.request, "synthetic_model",
                        lambda name: ResolvedModel(f"synthetic:{name}", None, demo_config()))
    from facli.run_options import RunOptions

    report = run_bench(BenchRequest(depths=(48,), run=RunOptions(device="cpu"), synthetic="demo",
                                    decode_tokens=3))
    assert report["facli"]["model"] == "synthetic:demo" and report["facli"]["synthetic"]
    assert report["transformers"]["depths"][0]["status"] == "ok"
    assert report["transformers"]["depths"][0]["new_tokens"] == 3
    assert report["facli"]["depths"][0]["new_tokens"] == 3
