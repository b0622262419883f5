"""Documents grouped by length, so that short ones are not held to the rows of the longest.

Each row of a batch holds a whole context of KV, so the context the runtime is shaped for
decides how many rows fit beside the weights. A corpus of many short documents and a few long
ones runs the short ones first, in many rows of a short context, then the long ones in the few
rows of a long context. Groups are powers of two of context, merged unless the shorter one
alone runs wider.
"""

import math
from dataclasses import dataclass

from facli.summarize.planning import PreparedDocument, first_prompts
from facli.summarize.strategies import Strategy


@dataclass(frozen=True)
class RowGroup:
    ctx: int  # the runtime's context for the group
    rows: int  # prompts decoded together
    items: tuple[PreparedDocument, ...]

    def describe(self) -> str:
        count = len(self.items)
        return (f"{count} document{'s' if count != 1 else ''} in {self.rows} "
                f"row{'s' if self.rows != 1 else ''} of {self.ctx} tokens")


def context_needed(item: PreparedDocument, settings, runtime_ctx: int) -> int:
    """Tokens of context the document's prompts and their summaries need; 0 for one that runs
    no prompt (unusable, or too long under --strategy fit)."""
    if item.ids is None:
        return 0
    budget, builder = settings.budget, settings.prompts.summarize
    if len(item.ids) > budget.document_tokens(builder):
        return 0 if settings.strategy is Strategy.FIT else runtime_ctx
    return min(runtime_ctx, len(item.ids) + builder.overhead + budget.max_new_tokens)


def length_buckets(items: list[PreparedDocument], settings,
                   runtime_ctx: int) -> list[tuple[int, list[PreparedDocument]]]:
    """(context, documents) by the power of two that holds each document's context (capped at
    runtime_ctx), shortest first; documents that run no prompt join the shortest."""
    needs = [context_needed(item, settings, runtime_ctx) for item in items]
    idle = min((needed for needed in needs if needed), default=runtime_ctx)
    buckets: dict[int, list[PreparedDocument]] = {}
    for item, needed in zip(items, needs):
        ctx = min(runtime_ctx, 1 << math.ceil(math.log2(needed or idle)))
        buckets.setdefault(ctx, []).append(item)
    return sorted(buckets.items())


def merge_buckets(buckets: list[tuple[int, list[PreparedDocument]]], resident_rows: list[int],
                  settings, cap: int) -> list[RowGroup]:
    """Groups of adjacent buckets, each in min(its context's resident rows, its first prompts,
    cap) rows (resident_rows: one per bucket). A bucket joins the group before it unless that
    group alone would run in more rows than the two together: splitting costs a drain of the
    rows between groups, so it must buy width."""
    groups: list[tuple[int, int, list[PreparedDocument]]] = []
    for (ctx, items), resident in zip(buckets, resident_rows):
        if groups:
            before = groups[-1]
            merged = (ctx, resident, before[2] + items)
            if _rows(merged, settings, cap) >= _rows(before, settings, cap):
                groups[-1] = merged
                continue
        groups.append((ctx, resident, list(items)))
    return [RowGroup(group[0], _rows(group, settings, cap), tuple(group[2])) for group in groups]


def _rows(group, settings, cap: int) -> int:
    _, resident, items = group
    prompts = first_prompts(items, settings.prompts, settings.budget, settings.strategy)
    return max(1, min(resident, cap, prompts))
