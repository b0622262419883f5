"""`facli summarize --plan-only`: the documents still to do, their groups and rows, each group's
memory plan and how long it should take, from the tokenizer and the planner alone (no weights
are read and nothing is written).

Time per group: the time model's prefill of every prompt, one after another, and
ceil(prompts / rows) rounds of --max-new-tokens decode steps, each at the plan's step time with
every row full: decode as long as it can be. Summaries that end early (EOS) and rows shorter
than the context make it shorter; loading, a warm-up per group (graph capture, kernel
compilation) and the host's share of each step are not counted. A map-reduce document's combine
prompt is counted once, with a summary per part.
"""

import math
from dataclasses import dataclass

from facli.offload.plan import Plan
from facli.offload.planner import predict_prompt
from facli.summarize.planning import PreparedDocument
from facli.summarize.row_groups import RowGroup
from facli.summarize.strategies import Strategy


@dataclass(frozen=True)
class GroupForecast:
    group: RowGroup
    prompt_lengths: tuple[int, ...]  # tokens of every prompt the group's documents run
    plan: Plan
    prefill_s: float
    decode_s: float  # with every summary --max-new-tokens long and every row full

    def to_dict(self) -> dict:
        return {"ctx": self.group.ctx, "rows": self.group.rows, "documents": len(self.group.items),
                "prompts": len(self.prompt_lengths), "prompt_tokens": sum(self.prompt_lengths),
                "peak_gpu_bytes": max(d.peak_bytes for d in self.plan.devices),
                "prefill_s": self.prefill_s, "decode_s_full_summaries": self.decode_s}


def prompt_lengths(item: PreparedDocument, settings) -> list[int]:
    """Tokens of each prompt the document runs under the job's strategy ([] for none)."""
    if item.ids is None:
        return []
    budget, prompts = settings.budget, settings.prompts
    limit, overhead = budget.document_tokens(prompts.summarize), prompts.summarize.overhead
    length = len(item.ids)
    if length <= limit:
        return [length + overhead]
    if settings.strategy is Strategy.TRUNCATE:
        return [limit + overhead]
    if settings.strategy is Strategy.FIT:
        return []
    parts = math.ceil(length / limit)
    combine = parts * budget.max_new_tokens + prompts.combine.overhead
    return [math.ceil(length / parts) + overhead] * parts + [min(combine, budget.ctx)]


def forecast_group(group: RowGroup, plan: Plan, config, hardware, settings) -> GroupForecast:
    lengths = tuple(n for item in group.items for n in prompt_lengths(item, settings))
    # predict_prompt's prefill is the plan's batch of such prompts, one after another.
    prefill = sum(predict_prompt(config, hardware, plan, n).ttft_s for n in lengths) / plan.batch
    rounds = math.ceil(len(lengths) / group.rows)
    decode = rounds * settings.budget.max_new_tokens * plan.timing.decode_step_s
    return GroupForecast(group, lengths, plan, prefill, decode)


def forecast_run(request) -> tuple[list[GroupForecast], int, int]:
    """(a forecast per group, documents to summarize, documents already in the output) for a
    SummarizeRequest, as run_summarize would group them."""
    from facli.parallel.context import SINGLE_PROCESS
    from facli.summarize.output import read_results
    from facli.summarize.run import corpus_row_groups, group_forecasts, open_corpus, select_pending

    request, resolved, _, corpus = open_corpus(request, log=lambda message: None)
    pending, skipped = select_pending(corpus.prepared, read_results(request.out),
                                      request.retry_failed)
    groups = corpus_row_groups(request, resolved, corpus, pending, SINGLE_PROCESS) if pending else []
    return group_forecasts(request, resolved, corpus, groups), len(pending), skipped


def format_forecast(forecasts: list[GroupForecast], pending: int, skipped: int, out) -> str:
    lines = [f"facli summarize plan: {pending} documents to summarize, {skipped} already in {out}"]
    if forecasts:
        lines += ["", "| group | context | rows | documents | prompts | prompt tokens | peak GiB "
                  "(plan) | prefill s | decode s (full summaries) |", "|" + " --- |" * 9]
    for index, f in enumerate(forecasts, 1):
        row = f.to_dict()
        lines.append(f"| {index} | {row['ctx']} | {row['rows']} | {row['documents']} | "
                     f"{row['prompts']} | {row['prompt_tokens']:,} | "
                     f"{row['peak_gpu_bytes'] / 2**30:.1f} | {f.prefill_s:.1f} | {f.decode_s:.1f} |")
    lines += ["", predicted_line(forecasts) + "; nothing was loaded or written"]
    return "\n".join(lines)


def predicted_line(forecasts: list[GroupForecast]) -> str:
    prefill = sum(f.prefill_s for f in forecasts)
    decode = sum(f.decode_s for f in forecasts)
    return (f"predicted: {prefill:.1f} s of prefill and up to {decode:.1f} s of decode (every "
            "summary --max-new-tokens long), after the weights load and a warm-up per group")
