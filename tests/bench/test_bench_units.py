"""`facli bench`: the pure parts (requests, prompts, derived figures, table) with made-up reports."""

import copy

import pytest

from facli.bench.baseline import FirstTokenClock
from facli.bench.report import (
    GIB,
    add_derived,
    bandwidth_table,
    decode_bound,
    error_pct,
    format_report,
    largest_ok,
    markdown_table,
    prediction_errors,
    ratio,
    speedups,
)
from facli.bench.request import PROMPT_SLACK, BenchRequest, prompt_ids, prompt_length, random_text
from facli.commands.bench import parse_depths
from facli.errors import FacliError
from facli.run_options import RunOptions


def test_error_pct_is_signed_relative_to_the_measurement():
    assert error_pct(110, 100) == pytest.approx(10.0)
    assert error_pct(95, 100) == pytest.approx(-5.0)
    assert error_pct(None, 100) is None and error_pct(1, None) is None and error_pct(1, 0) is None


def test_ratio_and_largest_ok():
    assert ratio(6, 3) == 2 and ratio(None, 3) is None and ratio(1, 0) is None
    records = [{"depth": 8, "status": "ok"}, {"depth": 32, "status": "ok"},
               {"depth": 128, "status": "out of memory"}]
    assert largest_ok(records) == 32
    assert largest_ok([{"depth": 8, "status": "error"}]) is None


def test_parse_depths_and_request_validation():
    assert parse_depths("8k, 32k,256k") == (8192, 32768, 262144)
    with pytest.raises(FacliError, match="expected a context length"):
        parse_depths("8k,lots")
    assert BenchRequest(depths=(4096, 1024, 4096)).depths == (1024, 4096)
    with pytest.raises(FacliError, match="at most one of --model and --synthetic"):
        BenchRequest(depths=(1024,), run=RunOptions(model="x"), synthetic="llama-7b")
    with pytest.raises(FacliError, match="--baseline one of transformers, none"):
        BenchRequest(depths=(1024,), baseline="vllm")
    with pytest.raises(FacliError, match="--decode-mode one of auto, prefetch, cpu, split"):
        BenchRequest(depths=(1024,), run=RunOptions(decode_mode="disk"))
    with pytest.raises(FacliError, match=r"--decode-tokens >= 3 .*got 2"):
        BenchRequest(depths=(1024,), decode_tokens=2)  # one decode step: its rate is not timed
    with pytest.raises(FacliError, match=r"every --depth >= 73"):
        BenchRequest(depths=(72, 1024), decode_tokens=64)
    with pytest.raises(FacliError, match=r"--ctx >= every --depth \(4096\), got 2048"):
        BenchRequest(depths=(1024, 4096), run=RunOptions(ctx=2048))


def test_prompt_fills_the_depth_exactly():
    assert prompt_length(8192, 64) == 8192 - 64 - PROMPT_SLACK
    text = random_text(50)
    assert len(text) == 50 and all(32 <= ord(c) < 127 for c in text) and text == random_text(50)
    assert len(prompt_ids(lambda t: [1] + [ord(c) for c in t], 100)) == 100
    # a tokenizer that merges characters: more text is drawn until there are enough ids
    assert len(prompt_ids(lambda t: list(range(len(t) // 3)), 100)) == 100


def test_first_token_clock_skips_the_prompt():
    import torch

    clock = FirstTokenClock()
    clock.put(torch.arange(10))
    assert clock.first_token_at is None
    clock.put(torch.tensor([3]))
    first = clock.first_token_at
    clock.put(torch.tensor([4]))
    assert first is not None and clock.first_token_at == first


def _plan(peaks, ttft=1.0, decode=100.0, host=0, kv_dtype="bf16"):
    return {"peak_gpu_bytes": peaks, "ttft_s": ttft, "prefill_tokens_per_s": 8000 / ttft,
            "decode_tokens_per_s": decode, "host_kv_bytes": host, "host_layers": 0,
            "kv_dtype": kv_dtype, "summary": "plan: ...", "plan": {}}


def _facli(depth, peaks, plan=None, status="ok"):
    record = {"depth": depth, "prompt_tokens": depth - 72, "status": status,
              "error": None if status == "ok" else status, "plan": plan,
              "peak_gpu_bytes": peaks, "host_kv_bytes": 0, "host_rss_bytes": 1}
    if status == "ok":
        record.update(new_tokens=64, ttft_s=0.8, prefill_tokens_per_s=(depth - 72) / 0.8,
                      decode_tokens_per_s=120.0)
    return record


def _baseline(depth, status="ok"):
    record = {"depth": depth, "prompt_tokens": depth - 72, "status": status,
              "error": None if status == "ok" else status}
    if status == "ok":
        record.update(new_tokens=64, ttft_s=1.6, prefill_tokens_per_s=(depth - 72) / 1.6,
                      decode_tokens_per_s=12.0, peak_gpu_bytes=40 * GIB)
    return record


def _report():
    facli = {"model": "synthetic:llama-7b", "dtype": "bfloat16", "device": "cuda", "load_s": 1.0,
             "decode_bytes": {"weights_per_rank": 13 * GIB, "kv_elements_per_token_per_rank": 262144,
                              "kv_element_bytes": 2},
             "depths": [_facli(8192, [20 * GIB, 22 * GIB], _plan([21 * GIB, 21 * GIB])),
                        _facli(32768, [30 * GIB, 30 * GIB], None),
                        _facli(131072, None, status="out of memory")]}
    baseline = {"version": "5", "dtype": "bfloat16", "attention": "sdpa",
                "gpu_bytes_in_use_before": 0,
                "depths": [_baseline(8192), _baseline(32768, "out of memory"),
                           _baseline(131072, "out of memory")]}
    env = {"device": "cuda", "gpus": ["NVIDIA H200", "NVIDIA H200"], "cpu": "x86_64",
           "torch": "2.11", "cuda": "13.0", "triton": "3.6", "transformers": "5.17",
           "python": "3.12", "facli": "0.1.0", "commit": "abc1234", "dirty": False,
           "date_utc": "2026-11-22T00:00:00Z"}
    request = {"depths": [8192, 32768, 131072], "decode_tokens": 64, "devices": 2}
    return {"schema": "facli.bench/1", "environment": env, "request": request, "facli": facli,
            "transformers": baseline}


def test_prediction_errors_take_the_worst_rank():
    record = _facli(8192, [20 * GIB, 22 * GIB], _plan([21 * GIB, 21 * GIB], ttft=1.0, decode=150.0))
    errors = prediction_errors(record)
    assert errors["peak_gpu_bytes"] == pytest.approx(5.0)  # rank 0: +5%, rank 1: -4.5%
    assert errors["peak_gpu_bytes_per_device"][1] == pytest.approx(-100 / 22)
    assert errors["ttft_s"] == pytest.approx(25.0) and errors["decode_tokens_per_s"] == pytest.approx(25.0)
    assert prediction_errors(_facli(8192, [1], None)) is None
    assert prediction_errors(_facli(8192, None, _plan([1]), status="out of memory")) is None


def test_decode_bound_counts_weights_and_kv_at_the_mean_length():
    record = _facli(8192, [1], _plan([1]))
    decode = {"weights_per_rank": 10**9, "kv_elements_per_token_per_rank": 1000, "kv_element_bytes": 2}
    bound = decode_bound(record, decode, hbm_gbps=4000.0)
    step = 10**9 + 2000 * (8192 - 72 + 32)
    assert bound["bytes_per_step_per_rank"] == step
    assert bound["bound_tokens_per_s"] == pytest.approx(4000e9 / step)
    assert bound["fraction_of_bound"] == pytest.approx(120.0 / (4000e9 / step))
    fp8 = decode_bound(_facli(8192, [1], _plan([1], kv_dtype="fp8")), decode, 4000.0)
    assert fp8["bytes_per_step_per_rank"] == 10**9 + 1000 * (8192 - 72 + 32)
    assert decode_bound(record, decode, None)["bound_tokens_per_s"] is None


def test_decode_bound_with_rows_reads_the_weights_once_and_every_row_s_kv():
    record = {**_facli(8192, [1], _plan([1])), "rows": 4}
    decode = {"weights_per_rank": 10**9, "kv_elements_per_token_per_rank": 1000, "kv_element_bytes": 2}
    bound = decode_bound(record, decode, hbm_gbps=4000.0)
    step = 10**9 + 4 * 2000 * (8192 - 72 + 32)
    assert bound["bytes_per_step_per_rank"] == step
    assert bound["bound_tokens_per_s"] == pytest.approx(4 * 4000e9 / step)


def test_speedups_need_both_sides():
    both = speedups(_facli(8192, [1]), _baseline(8192))
    assert both["prefill_tokens_per_s"] == pytest.approx(2.0) and both["ttft"] == pytest.approx(2.0)
    assert both["decode_tokens_per_s"] == pytest.approx(10.0)
    assert speedups(_facli(8192, [1]), _baseline(8192, "out of memory"))["decode_tokens_per_s"] is None
    assert speedups(_facli(8192, [1]), None) is None


def test_add_derived_and_the_table():
    report = add_derived(_report(), hbm_gbps=4200.0)
    assert report["largest_context"] == {"facli": 32768, "transformers": 8192, "ratio": 4.0}
    assert report["comparison"][0]["decode_tokens_per_s"] == pytest.approx(10.0)
    assert report["comparison"][1]["decode_tokens_per_s"] is None
    assert report["facli"]["depths"][0]["error_pct"]["peak_gpu_bytes"] == pytest.approx(5.0)
    text = format_report(report)
    lines = text.splitlines()
    assert "2 x NVIDIA H200" in lines[0] and "abc1234" in lines[0]
    row_8k = next(line for line in lines if line.startswith("| 8k |"))
    assert "22.0 (21.0, +5.0%)" in row_8k and "10.00x" in row_8k and "40.0" in row_8k
    row_128k = next(line for line in lines if line.startswith("| 128k |"))
    assert row_128k.count("out of memory") == 2
    assert lines[-1] == "Largest context reached: facli 32k, transformers 8k (4.0x)"


def test_bandwidth_table_names_the_decode_mode_of_host_layers():
    report = _report()
    offloading = _plan([21 * GIB, 21 * GIB], host=16 * GIB)
    offloading.update(host_layers=4, decode_mode="split")
    report["facli"]["depths"][0]["plan"] = offloading
    text = bandwidth_table(add_derived(report, hbm_gbps=4200.0))
    assert text.splitlines()[2].endswith("| 4 (split decode) |")
    assert text.splitlines()[3].endswith("| 0 |")
    offloading["packed"] = True  # a prompt whose host rows all fit the staging slots
    text = bandwidth_table(add_derived(report, hbm_gbps=4200.0))
    assert text.splitlines()[2].endswith("| 4 (rows kept in the staging slots) |")


def test_table_without_baseline_has_no_transformers_columns():
    report = _report()
    report["transformers"] = None
    text = format_report(add_derived(copy.deepcopy(report), hbm_gbps=None))
    assert "HF TTFT" not in text and text.splitlines()[-1] == "Largest context reached: facli 32k"


def test_markdown_table_shape():
    table = markdown_table(["a", "b"], [["1", "2"], ["3", "4"]])
    assert table.splitlines() == ["| a | b |", "| --- | --- |", "| 1 | 2 |", "| 3 | 4 |"]


def _e2e():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "e2e.py"
    spec = importlib.util.spec_from_file_location("bench_e2e", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_e2e_targets_and_docs_section():
    e2e = _e2e()
    report = add_derived(_report(), hbm_gbps=4200.0)
    rows = {target: (measured, met) for target, measured, met in e2e.targets(report)}
    assert rows["largest context >= 2x transformers'"] == ("4.0x", "yes")
    assert rows["decode tok/s >= 5x transformers at 32K"] == ("not measured", "-")
    assert rows["plan peak memory error < 5%"] == ("+5.0% (worst)", "no")
    text = "# facli benchmarks\n\n## End to end\n\nold\n\n## Kernels\n\nkept\n"
    once = e2e.replace_section(text, "new body")
    assert once == "# facli benchmarks\n\n## End to end\n\nnew body\n\n## Kernels\n\nkept\n"
    assert e2e.replace_section(once, "new body") == once
    assert e2e.replace_section("# facli benchmarks\n", "b").endswith("\n\n## End to end\n\nb\n")


class _FakeRuntime:
    """What measure_depth uses of a Runtime; fails as told per depth."""

    def __init__(self, failures):
        import torch

        from facli.parallel.context import SINGLE_PROCESS
        from facli.models.recipe_loader import load_model_recipe

        self.failures, self.parallel, self.device = failures, SINGLE_PROCESS, torch.device("cpu")
        self.config = load_model_recipe("llama-7b").config
        self.plan, self.kv, self.prefill_chunk, self.depth, self.calls = None, None, 512, None, []
        self.ctx, self.contexts, self.rows = None, [], 1

    def predict_prompt(self, prompt_tokens):
        from facli.run.runtime import Runtime

        return Runtime.predict_prompt(self, prompt_tokens)

    def reshape(self, *, ctx, rows):
        self.depth = self.ctx = ctx
        self.contexts.append(ctx)
        if self.failures.get(ctx) == "plan":
            from facli.errors import OutOfMemoryPlanError

            raise OutOfMemoryPlanError(f"expected {ctx} to fit, it does not")
        self.rows = rows

    def generate(self, ids, *, max_new_tokens, sampling, ignore_eos):
        import torch

        from facli.run.runtime import GenerationResult

        assert ignore_eos and sampling.temperature == 0
        self.calls.append((self.depth, len(ids), max_new_tokens))
        if self.failures.get(self.depth) == "oom" and len(self.calls) % 2 == 0:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return GenerationResult(list(range(max_new_tokens)), "", len(ids), 0.5, 40.0, None, "length")


def test_measure_depth_turns_failures_into_statuses():
    from facli.bench.measure import measure_depth

    runtime = _FakeRuntime({2048: "oom", 4096: "plan"})
    request = BenchRequest(depths=(1024, 2048, 4096), decode_tokens=8)
    prompt = list(range(5000))
    ok, oom, no_fit = (measure_depth(runtime, d, prompt, request) for d in request.depths)
    assert ok["status"] == "ok" and ok["new_tokens"] == 8 and ok["prompt_tokens"] == 1008
    assert ok["prefill_tokens_per_s"] == pytest.approx(1008 / 0.5) and ok["decode_tokens_per_s"] == 40
    assert runtime.calls[0] == (1024, 512 + 1008 % 512, 2)  # warm-up: a full chunk and the tail
    assert runtime.calls[1] == (1024, 1008, 8)
    assert oom["status"] == "out of memory" and "ttft_s" not in oom
    assert no_fit["status"] == "does not fit" and "4096" in no_fit["error"]
    assert [c[0] for c in runtime.calls] == [1024, 1024, 2048, 2048]  # nothing ran at 4096


def test_one_ctx_keeps_one_store_for_every_depth():
    """With --ctx the runtime is planned (and its KV store built) once: each depth's record
    holds the plan's figures for its own prompt."""
    from facli.bench.measure import measure_depth
    from facli.planner.hardware import load_hardware
    from facli.planner.search import PlanOptions, plan
    from facli.models.recipe_loader import load_model_recipe

    runtime = _FakeRuntime({})
    runtime.config, runtime.hardware = load_model_recipe("llama-7b").config, load_hardware("1xH200")
    runtime.plan = plan(runtime.config, runtime.hardware, 8192, 1, PlanOptions(model_name="m"))
    runtime.ctx, runtime.depth = 8192, 8192
    runtime.asked_decode_mode = "auto"
    request = BenchRequest(depths=(1024, 4096), decode_tokens=8, run=RunOptions(ctx=8192))
    records = [measure_depth(runtime, d, list(range(5000)), request) for d in request.depths]
    assert runtime.contexts == []
    assert [r["status"] for r in records] == ["ok", "ok"]
    assert records[0]["plan"]["ttft_s"] < records[1]["plan"]["ttft_s"] < records[1]["plan"]["ctx_ttft_s"]


def test_commit_comes_from_the_environment_first(monkeypatch):
    from facli.bench.environment import git_commit

    monkeypatch.setenv("FACLI_COMMIT", "feedbee")
    assert git_commit()["commit"] == "feedbee"
    monkeypatch.delenv("FACLI_COMMIT")
    assert git_commit()["commit"] not in ("feedbee", None)
