"""`facli summarize --plan-only`: the documents still to do, their groups and rows, each group's
memory plan and how long it should take, from the tokenizer and the planner alone (no weights
are read and nothing is written).

Time per group, from the time model (planner.search.predict_prompt) on the group's placement:
- prefill: every prompt's own, one after another;
- decode: with every summary --max-new-tokens long, the rows run in rounds of `rows` prompts
  that start and end together, as the runtime hands them out. A round's steps read the weights
  once and each row's cache at its mean length over the round.
- warm-up: on a GPU, GROUP_WARMUP_S per group (its first prefill and decode step load the
  kernels and capture the step's CUDA graph).
Summaries that end early (EOS) make decode shorter. Loading the weights, compiling kernels
never compiled on the machine and the host's share of each step are not counted. A map-reduce
document's combine prompt is counted once, with a summary per part.
"""

from dataclasses import dataclass, replace

from facli.models.resolve import ResolvedModel
from facli.parallel.context import SINGLE_PROCESS
from facli.planner.plan import Plan
from facli.planner.search import FP8_HINT, predict_prompt
from facli.summarize.corpus import (
    Corpus,
    SummarizeRequest,
    corpus_row_groups,
    group_plan,
    open_corpus,
    select_pending,
)
from facli.summarize.output import read_results
from facli.summarize.planning import prompt_lengths
from facli.summarize.row_groups import RowGroup
from facli.units import format_bytes, format_seconds

# What each group's documents take beyond the time model's prefill and decode, on a GPU with
# the kernels compiled before (Triton's cache). Four warm runs of benchmarks/summarize_batched.py
# on one H200 took 0.8-1.3 s per group more than their forecast: 48 documents in one group, 16
# long ones with a bf16 and with an fp8 cache, and a mixed corpus in two groups. In-sample: the
# runs fitted it (docs/calibration.md).
GROUP_WARMUP_S = 1.0


@dataclass(frozen=True)
class GroupForecast:
    group: RowGroup
    prompt_lengths: tuple[int, ...]  # tokens of every prompt the group's documents run
    plan: Plan
    prefill_s: float | None  # None where the plan's time is unknown (plan.timing.unknown)
    decode_s: float | None  # with every summary --max-new-tokens long
    warmup_s: float

    def to_dict(self) -> dict:
        return {"ctx": self.group.ctx, "rows": self.group.rows, "documents": len(self.group.items),
                "prompts": len(self.prompt_lengths), "prompt_tokens": sum(self.prompt_lengths),
                "peak_gpu_bytes": max(d.peak_bytes for d in self.plan.devices),
                "prefill_s": self.prefill_s, "decode_s": self.decode_s, "warmup_s": self.warmup_s}


def forecast_group(group: RowGroup, plan: Plan, config, hardware, settings) -> GroupForecast:
    lengths = tuple(n for item in group.items for n in prompt_lengths(item, settings))
    if plan.timing.unknown:
        return GroupForecast(group, lengths, plan, None, None, 0.0)
    prefill = sum(predict_prompt(config, hardware, plan, n, batch=1).ttft_s for n in lengths)
    new_tokens = settings.budget.max_new_tokens
    decode = 0.0
    for first in range(0, len(lengths), group.rows):
        rows = lengths[first:first + group.rows]
        # The first token comes with the prefill; each of the others is one step of the round.
        mean = round(sum(rows) / len(rows) + new_tokens / 2)
        rate = predict_prompt(config, hardware, plan, min(mean, plan.ctx), batch=len(rows))
        decode += (new_tokens - 1) * len(rows) / rate.decode_tokens_per_s
    warmup = GROUP_WARMUP_S if plan.device_kind == "cuda" and lengths else 0.0
    return GroupForecast(group, lengths, plan, prefill, decode, warmup)


@dataclass(frozen=True)
class RunForecast:
    """What --plan-only prints: a forecast per group for the documents still to do; with
    fp8_groups, the same documents with --kv-dtype fp8, where a group's plan hints at it."""

    groups: list[GroupForecast]
    pending: int  # documents to summarize
    skipped: int  # documents already in the output
    fp8_groups: list[GroupForecast] | None = None

    def to_dict(self, out) -> dict:
        groups = [f.to_dict() for f in self.groups]
        fp8 = None if self.fp8_groups is None else {
            "groups": [f.to_dict() for f in self.fp8_groups],
            "total_s": total_seconds(self.fp8_groups)}
        return {"output": str(out), "to_summarize": self.pending, "skipped": self.skipped,
                "groups": groups, **{key: _sum(g[key] for g in groups)
                                     for key in ("prefill_s", "decode_s", "warmup_s")},
                "total_s": total_seconds(self.groups), "with_fp8_kv": fp8}


def total_seconds(forecasts: list[GroupForecast]) -> float | None:
    """Seconds of every group, or None where one group's time is unknown."""
    return _sum(value for f in forecasts for value in (f.prefill_s, f.decode_s, f.warmup_s))


def _sum(values) -> float | None:
    values = list(values)
    return None if None in values else sum(values)


def group_forecasts(request: SummarizeRequest, resolved: ResolvedModel, corpus: Corpus,
                    groups: list[RowGroup]) -> list[GroupForecast]:
    """Each group's plan and predicted time."""
    return [forecast_group(group, group_plan(request, resolved, group), resolved.config,
                           request.hardware, corpus.settings) for group in groups]


def forecast_run(request: SummarizeRequest) -> RunForecast:
    """The forecast of a SummarizeRequest, grouped as run_summarize would group it."""
    request, resolved, _, corpus = open_corpus(request, log=lambda message: None)
    pending, skipped = select_pending(corpus.prepared, read_results(request.out),
                                      request.retry_failed)

    def forecasts(chosen):
        if not pending:
            return []
        groups = corpus_row_groups(chosen, resolved, corpus, pending, SINGLE_PROCESS)
        return group_forecasts(chosen, resolved, corpus, groups)

    groups = forecasts(request)
    fp8_hinted = any(hint.startswith(FP8_HINT) for f in groups for hint in f.plan.hints)
    fp8 = replace(request, run=replace(request.run, kv_dtype="fp8"))
    fp8_groups = forecasts(fp8) if fp8_hinted else None
    return RunForecast(groups, len(pending), skipped, fp8_groups)


def format_forecast(run: RunForecast, out) -> str:
    forecasts = run.groups
    lines = [f"facli summarize plan: {run.pending} documents to summarize, {run.skipped} already "
             f"in {out}"]
    if forecasts:
        lines += ["", "| group | context | rows | documents | prompts | prompt tokens | peak "
                  "(plan) | prefill | decode | warm-up |", "|" + " --- |" * 10]
    for index, f in enumerate(forecasts, 1):
        row = f.to_dict()
        lines.append(f"| {index} | {row['ctx']} | {row['rows']} | {row['documents']} | "
                     f"{row['prompts']} | {row['prompt_tokens']:,} | "
                     f"{format_bytes(row['peak_gpu_bytes'])} | {_seconds(f.prefill_s)} | "
                     f"{_seconds(f.decode_s)} | {format_seconds(f.warmup_s)} |")
    lines += [f"group {index}: {hint}" for index, f in enumerate(forecasts, 1)
              for hint in f.plan.hints]
    if run.fp8_groups is not None:
        rows = ", then ".join(str(f.group.rows) for f in run.fp8_groups)
        fp8_total = format_seconds(total_seconds(run.fp8_groups))
        lines.append(f"with --kv-dtype fp8 (lossy): {fp8_total} in all, in {rows} rows, against "
                     f"{format_seconds(total_seconds(forecasts))}")
    lines += ["", predicted_line(forecasts) + "; nothing was loaded or written"]
    return "\n".join(lines)


def _seconds(value: float | None) -> str:
    return "unknown" if value is None else format_seconds(value)


def predicted_line(forecasts: list[GroupForecast]) -> str:
    unknown = next((f.plan.timing.unknown for f in forecasts if f.plan.timing.unknown), "")
    if unknown:
        return f"predicted: time unknown ({unknown})"
    prefill = sum(f.prefill_s for f in forecasts)
    decode = sum(f.decode_s for f in forecasts)
    warmup = sum(f.warmup_s for f in forecasts)
    parts = f"{format_seconds(prefill)} of prefill, {format_seconds(decode)} of decode"
    if warmup:
        parts += f", {format_seconds(warmup)} of warm-up"
    return (f"predicted: {format_seconds(total_seconds(forecasts))} ({parts}; every summary "
            "--max-new-tokens long), after the weights load")
