"""facli summarize --plan-only: groups, rows, memory and time for the documents still to do,
with nothing loaded or written; against the time model's own figures and a real run."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

from facli.cli import app
from facli.models.recipe_loader import load_model_recipe
from facli.models.resolve import resolve_model
from facli.models.tokenizer import load_tokenizer
from facli.planner import cpu_time, hardware
from facli.planner.hardware import CpuSpec, load_hardware
from facli.planner.search import predict_prompt
from facli.summarize.forecast import (
    GROUP_WARMUP_S,
    GroupForecast,
    RunForecast,
    format_forecast,
    forecast_run,
    predicted_line,
    total_seconds,
)
from facli.summarize.planning import PreparedDocument, plan_memory, prompt_lengths
from facli.summarize.prompting import make_prompts
from facli.summarize.row_groups import RowGroup
from facli.summarize.run import run_summarize
from facli.summarize.strategies import Budget, Strategy
from facli.units import format_seconds
from summarize_cases import CTX, NEW, mixed_folder, numbered_folder, request


@pytest.fixture
def timed_cpu(monkeypatch):
    """This machine's CPU as one whose rates are measured, whatever its instruction set."""
    isa = sorted(cpu_time.CPU_CONSTANTS)[0]
    monkeypatch.setattr(hardware, "detect_cpu", lambda: CpuSpec(torch.get_num_threads(), isa))


def test_every_pending_document_is_forecast_and_nothing_is_written(tmp_path, capsys, timed_cpu):
    docs, out = numbered_folder(tmp_path), tmp_path / "out" / "r.jsonl"
    run = forecast_run(request(docs, out))
    forecasts = run.groups
    assert (run.pending, run.skipped, run.fp8_groups) == (8, 0, None) and not out.parent.exists()
    assert sum(len(f.group.items) for f in forecasts) == 8
    for f in forecasts:
        assert (f.plan.batch, f.plan.ctx) == (f.group.rows, f.group.ctx)
        assert f.prefill_s > 0 and f.decode_s > 0 and f.warmup_s == 0  # a CPU run
    line = predicted_line(forecasts)
    total = sum(f.prefill_s + f.decode_s for f in forecasts)
    assert line.startswith(f"predicted: {format_seconds(total)} (") and "warm-up" not in line
    run_summarize(request(docs, out))
    # The run itself says the same prediction before it loads the model.
    assert f"facli: {predicted_line(forecasts)}\n" in capsys.readouterr().err
    done = forecast_run(request(docs, out))
    assert (done.groups, done.pending, done.skipped) == ([], 0, 8)


def test_prefill_is_each_prompt_s_own_at_the_group_s_placement(tmp_path):
    h200 = load_hardware("1xH200-141GB")
    run = forecast_run(request(mixed_folder(tmp_path), tmp_path / "r.jsonl", hardware=h200,
                               strategy=Strategy.MAP_REDUCE))
    forecasts, pending = run.groups, run.pending
    model = resolve_model(None).config
    for f in forecasts:
        one_by_one = sum(predict_prompt(model, h200, f.plan, n).ttft_s for n in f.prompt_lengths)
        assert f.prefill_s == pytest.approx(one_by_one / f.plan.batch)
        # Rounds of `rows` prompts, each decoding NEW - 1 steps at its mean length.
        rounds = [f.prompt_lengths[i:i + f.group.rows]
                  for i in range(0, len(f.prompt_lengths), f.group.rows)]
        steps = [(NEW - 1) * len(r) / predict_prompt(
            model, h200, f.plan, round(sum(r) / len(r) + NEW / 2), batch=len(r)).decode_tokens_per_s
            for r in rounds]
        assert f.decode_s == pytest.approx(sum(steps))
        assert f.decode_s <= math.ceil(len(f.prompt_lengths) / f.group.rows) * NEW * \
            f.plan.timing.decode_step_s  # rows full at the whole context: the most it can take
        # A GPU group pays one warm-up; one without prompts runs nothing.
        assert f.warmup_s == (GROUP_WARMUP_S if f.prompt_lengths else 0.0)
    settings = SimpleNamespace(strategy=Strategy.MAP_REDUCE, prompts=make_prompts(
        load_tokenizer(resolve_model(None).path), None), budget=Budget(ctx=CTX, max_new_tokens=NEW))
    counts = sorted(len(prompt_lengths(item, settings)) for f in forecasts for item in f.group.items)
    # Empty and latin-1 files run no prompt; four short ones one each; the long one in parts
    # and a combine prompt.
    assert pending == 7 and counts[:6] == [0, 0, 1, 1, 1, 1] and counts[6] >= 3


def _settings(strategy):
    """A budget of 100 tokens with 10 for the summary, under templates of 5 tokens."""
    template = SimpleNamespace(overhead=5)
    return SimpleNamespace(strategy=strategy, budget=Budget(ctx=100, max_new_tokens=10),
                           prompts=SimpleNamespace(summarize=template, combine=template))


@pytest.mark.parametrize("strategy, length, expected", [
    (Strategy.FIT, 60, [65]),
    (Strategy.FIT, 200, []),
    (Strategy.TRUNCATE, 200, [85 + 5]),
    (Strategy.MAP_REDUCE, 200, [67 + 5] * 3 + [3 * 10 + 5]),  # 85 tokens a part: 3 parts
])
def test_prompt_lengths_follow_the_strategy(strategy, length, expected):
    item = PreparedDocument(document=None, ids=tuple(range(length)))
    assert prompt_lengths(item, _settings(strategy)) == expected
    assert prompt_lengths(PreparedDocument(document=None, ids=None), _settings(strategy)) == []


def test_plan_only_for_a_hardware_recipe_and_not_for_a_run(tmp_path):
    docs, out = numbered_folder(tmp_path), tmp_path / "r.jsonl"
    args = ["summarize", str(docs), "--out", str(out), "--ctx", str(CTX), "--max-new-tokens",
            str(NEW), "--hardware", "1xH200-141GB"]
    planned = CliRunner().invoke(app, [*args, "--plan-only", "--json"])
    assert planned.exit_code == 0, planned.output
    (group,) = json.loads(planned.stdout.strip().splitlines()[-1])["groups"]
    assert group["rows"] == 8  # the H200 recipe keeps every document's row on its GPU
    run = CliRunner().invoke(app, args)
    assert run.exit_code == 1 and run.output.strip() == (
        "facli: error: expected --hardware only with --plan-only, got --hardware 1xH200-141GB "
        "for a run; a run plans on the machine it runs on")
    assert not out.exists()


def test_cli_plan_only_prints_the_table_and_one_json_line(tmp_path, timed_cpu):
    docs, out = numbered_folder(tmp_path), tmp_path / "r.jsonl"
    result = CliRunner().invoke(app, ["summarize", str(docs), "--out", str(out), "--ctx", str(CTX),
                                      "--max-new-tokens", str(NEW), "--device", "cpu",
                                      "--plan-only", "--json"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert lines[0] == f"facli summarize plan: 8 documents to summarize, 0 already in {out}"
    assert any(line.startswith("| 1 | ") for line in lines)
    report = json.loads(lines[-1])
    assert report["to_summarize"] == 8 and sum(g["documents"] for g in report["groups"]) == 8
    assert report["prefill_s"] > 0 and not out.exists()
    assert report["total_s"] == pytest.approx(report["prefill_s"] + report["decode_s"] +
                                              report["warmup_s"])
    assert report["with_fp8_kv"] is None  # no fp8 hint on a CPU


def test_rows_chosen_by_the_planner_name_fp8_where_it_holds_clearly_faster_rows():
    """The long corpus's group on the lent H200: 7 bf16 rows of 32,696 tokens, where an fp8
    cache holds 14 that decode 1.27x faster (docs/performance.md)."""
    config, h200 = load_model_recipe("llama-7b").config, load_hardware("1xH200-141GB")
    settings = dict(model_name="m", max_new_tokens=128, devices=None, dtype="auto", batch=7)
    hinted = plan_memory(config, 32696, h200, rows_hint=True, **settings)
    plain = plan_memory(config, 32696, h200, **settings)
    assert hinted.hints[:-1] == plain.hints
    assert hinted.hints[-1].startswith("hint: --kv-dtype fp8 (e4m3 with a scale per token and "
                                       "head, lossy) would keep 14 rows of ctx")
    group = RowGroup(32696, 7, ())
    hinted_group = GroupForecast(group, (32000,), hinted, 1.0, 2.0, 1.0)
    fp8_group = GroupForecast(RowGroup(32696, 14, ()), (32000,), hinted, 1.0, 1.5, 1.0)
    lines = format_forecast(RunForecast([hinted_group], 7, 0, [fp8_group]), "o").splitlines()
    assert f"group 1: {hinted.hints[-1]}" in lines
    assert "with --kv-dtype fp8 (lossy): 3.5 s in all, in 14 rows, against 4.0 s" in lines
    assert total_seconds([hinted_group, fp8_group]) == pytest.approx(7.5)


def llama_7b_shape(directory):
    """Llama-7B's config and the byte tokenizer, without weights: --plan-only reads none."""
    import transformers
    from safetensors.torch import save_file

    from facli.models.demo import byte_level_tokenizer

    transformers.LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                             num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                             max_position_embeddings=32768).save_pretrained(directory)
    byte_level_tokenizer().save_pretrained(str(directory))
    save_file({"unread": torch.zeros(1)}, str(directory / "model.safetensors"))
    return directory


def test_plan_only_forecasts_the_fp8_alternative_where_a_group_hints_at_it(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    for index in range(8):
        (docs / f"d{index}.txt").write_text(f"{index} " + "long text " * 3240)  # ~32K bytes
    checkpoint = llama_7b_shape(tmp_path / "llama-7b-shape")
    run = forecast_run(request(docs, tmp_path / "r.jsonl", model=str(checkpoint), ctx=32768,
                               max_new_tokens=128, device=None,
                               hardware=load_hardware("1xH200-141GB")))
    (bf16,) = run.groups
    assert bf16.group.rows == 7 and bf16.plan.kv_dtype == "bf16"
    assert any("would keep 14 rows" in hint for hint in bf16.plan.hints)
    (fp8,) = run.fp8_groups
    assert fp8.group.rows == 8 and fp8.plan.kv_dtype == "fp8"  # every document in one round
    assert total_seconds(run.fp8_groups) < total_seconds(run.groups)
    assert f"in 8 rows, against {format_seconds(total_seconds(run.groups))}" in \
        format_forecast(run, "r.jsonl")
