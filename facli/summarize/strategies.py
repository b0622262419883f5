"""What to do with a document longer than the context: fail it, cut it, or summarize in parts.

Each strategy is a generator of the document's tokens, the prompts and the token budget: it
yields the prompts to generate from, round by round, and is sent their results. The caller
decides how they run: one after another (`summarize`), or in the rows of a batch beside other
documents' prompts (facli.summarize.batched).
"""

import enum
import math
from dataclasses import dataclass
from typing import Callable, Generator

from facli.summarize.prompting import Prompts, PromptBuilder

ELISION = "\n\n[...]\n\n"
MAX_REDUCE_ROUNDS = 8


class Strategy(str, enum.Enum):
    FIT = "fit"
    TRUNCATE = "truncate"
    MAP_REDUCE = "map-reduce"


@dataclass(frozen=True)
class Budget:
    """A prompt plus `max_new_tokens` generated tokens must fit in `ctx`."""

    ctx: int
    max_new_tokens: int

    def document_tokens(self, builder: PromptBuilder) -> int:
        """How many document tokens fit next to the template and the generated tokens."""
        return self.ctx - self.max_new_tokens - builder.overhead


@dataclass(frozen=True)
class Outcome:
    summary: str | None
    prompt_tokens: int
    generated_tokens: int
    error: str | None = None


class DocumentFailed(Exception):
    """Generation for one document failed in a way that should not stop the batch."""


Generate = Callable[[list[int]], object]
# A strategy run: yields rounds of prompts that may run together, is sent their results (objects
# with .text, .prompt_tokens and .token_ids) in the same order, and returns the Outcome.
Steps = Generator[list[list[int]], list, Outcome]


def steps(strategy: Strategy, document_ids: list[int], prompts: Prompts, budget: Budget) -> Steps:
    """The rounds of prompts that summarize one tokenized document."""
    run = {Strategy.FIT: fit, Strategy.TRUNCATE: truncate, Strategy.MAP_REDUCE: map_reduce}[strategy]
    return run(document_ids, prompts, budget)


def summarize(strategy: Strategy, document_ids: list[int], prompts: Prompts, budget: Budget,
              generate: Generate) -> Outcome:
    """Summarize one document, one prompt after another; a document that cannot be done comes
    back failed."""
    return run_steps(steps(strategy, document_ids, prompts, budget), generate)


def run_steps(run: Steps, generate: Generate) -> Outcome:
    try:
        round_prompts = next(run)
        while True:
            round_prompts = run.send([generate(prompt) for prompt in round_prompts])
    except StopIteration as finished:
        return finished.value


def fit(document_ids, prompts: Prompts, budget: Budget) -> Steps:
    builder = prompts.summarize
    limit = budget.document_tokens(builder)
    if len(document_ids) > limit:
        return Outcome(None, len(document_ids) + builder.overhead, 0, (
            f"expected at most {limit} document tokens to fit --ctx {budget.ctx} with "
            f"--max-new-tokens {budget.max_new_tokens}, got {len(document_ids)}; use "
            "--strategy truncate or map-reduce, or a larger --ctx"
        ))
    return (yield from _single(builder, document_ids))


def truncate(document_ids, prompts: Prompts, budget: Budget) -> Steps:
    """Keep the head and the tail of a long document, with an elision mark between them."""
    builder = prompts.summarize
    return (yield from _single(builder, cut_middle(document_ids, budget.document_tokens(builder), builder)))


def cut_middle(document_ids: list[int], limit: int, builder: PromptBuilder) -> list[int]:
    if len(document_ids) <= limit:
        return list(document_ids)
    mark = builder.encode(ELISION)
    if len(mark) >= limit // 2:
        mark = []
    keep = limit - len(mark)
    head, tail = keep - keep // 2, keep // 2
    return [*document_ids[:head], *mark, *(document_ids[-tail:] if tail else [])]


def map_reduce(document_ids, prompts: Prompts, budget: Budget) -> Steps:
    """Summarize context-sized chunks (one round: they may run together), then the joined
    summaries, until one prompt holds them."""
    ids, builder = list(document_ids), prompts.summarize
    prompt_tokens = generated_tokens = 0
    for _ in range(MAX_REDUCE_ROUNDS):
        limit = budget.document_tokens(builder)
        if len(ids) <= limit:
            last = yield from _single(builder, ids)
            return Outcome(last.summary, prompt_tokens + last.prompt_tokens,
                           generated_tokens + last.generated_tokens)
        results = yield [builder.build(chunk) for chunk in split_even(ids, limit)]
        prompt_tokens += sum(result.prompt_tokens for result in results)
        generated_tokens += sum(len(result.token_ids) for result in results)
        shorter = prompts.combine.encode("\n\n".join(result.text.strip() for result in results))
        if len(shorter) >= len(ids):
            break
        ids, builder = shorter, prompts.combine
    return Outcome(None, prompt_tokens, generated_tokens, (
        f"expected chunk summaries to shrink to fit --ctx {budget.ctx}, got {len(ids)} tokens "
        "of summaries; lower --max-new-tokens or raise --ctx"
    ))


def failure(document_ids, prompts: Prompts, exc: Exception) -> Outcome:
    """The outcome of a document whose generation raised `exc`."""
    return Outcome(None, len(document_ids) + prompts.summarize.overhead, 0, str(exc))


def split_even(ids: list[int], limit: int) -> list[list[int]]:
    """Split into the fewest chunks of at most `limit` tokens, of nearly equal length."""
    count = math.ceil(len(ids) / limit)
    size = math.ceil(len(ids) / count)
    return [ids[start:start + size] for start in range(0, len(ids), size)]


def _single(builder: PromptBuilder, document_ids: list[int]) -> Steps:
    (result,) = yield [builder.build(document_ids)]
    return Outcome(result.text, result.prompt_tokens, len(result.token_ids))
