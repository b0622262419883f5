"""What to do with a document longer than the context: fail it, cut it, or summarize in parts.

Each strategy is a function of the document's tokens, the prompts, the token budget and a
`generate(prompt_ids) -> GenerationResult` callable, so it runs the same with any runtime.
"""

import enum
import math
from dataclasses import dataclass
from typing import Callable

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


def summarize(strategy: Strategy, document_ids: list[int], prompts: Prompts, budget: Budget,
              generate: Generate) -> Outcome:
    """Summarize one tokenized document; a document that cannot be done comes back failed."""
    run = {Strategy.FIT: fit, Strategy.TRUNCATE: truncate, Strategy.MAP_REDUCE: map_reduce}[strategy]
    return run(document_ids, prompts, budget, generate)


def fit(document_ids, prompts: Prompts, budget: Budget, generate: Generate) -> Outcome:
    builder = prompts.summarize
    limit = budget.document_tokens(builder)
    if len(document_ids) > limit:
        return Outcome(None, len(document_ids) + builder.overhead, 0, (
            f"expected at most {limit} document tokens to fit --ctx {budget.ctx} with "
            f"--max-new-tokens {budget.max_new_tokens}, got {len(document_ids)}; use "
            "--strategy truncate or map-reduce, or a larger --ctx"
        ))
    return _single(builder, document_ids, generate)


def truncate(document_ids, prompts: Prompts, budget: Budget, generate: Generate) -> Outcome:
    """Keep the head and the tail of a long document, with an elision mark between them."""
    builder = prompts.summarize
    return _single(builder, cut_middle(document_ids, budget.document_tokens(builder), builder), generate)


def cut_middle(document_ids: list[int], limit: int, builder: PromptBuilder) -> list[int]:
    if len(document_ids) <= limit:
        return list(document_ids)
    mark = builder.encode(ELISION)
    if len(mark) >= limit // 2:
        mark = []
    keep = limit - len(mark)
    head, tail = keep - keep // 2, keep // 2
    return [*document_ids[:head], *mark, *(document_ids[-tail:] if tail else [])]


def map_reduce(document_ids, prompts: Prompts, budget: Budget, generate: Generate) -> Outcome:
    """Summarize context-sized chunks, then the joined summaries, until one prompt holds them."""
    ids, builder = list(document_ids), prompts.summarize
    prompt_tokens = generated_tokens = 0
    for _ in range(MAX_REDUCE_ROUNDS):
        limit = budget.document_tokens(builder)
        if len(ids) <= limit:
            last = _single(builder, ids, generate)
            return Outcome(last.summary, prompt_tokens + last.prompt_tokens,
                           generated_tokens + last.generated_tokens)
        summaries = []
        for chunk in split_even(ids, limit):
            result = generate(builder.build(chunk))
            prompt_tokens += result.prompt_tokens
            generated_tokens += len(result.token_ids)
            summaries.append(result.text.strip())
        shorter = prompts.combine.encode("\n\n".join(summaries))
        if len(shorter) >= len(ids):
            break
        ids, builder = shorter, prompts.combine
    return Outcome(None, prompt_tokens, generated_tokens, (
        f"expected chunk summaries to shrink to fit --ctx {budget.ctx}, got {len(ids)} tokens "
        "of summaries; lower --max-new-tokens or raise --ctx"
    ))


def split_even(ids: list[int], limit: int) -> list[list[int]]:
    """Split into the fewest chunks of at most `limit` tokens, of nearly equal length."""
    count = math.ceil(len(ids) / limit)
    size = math.ceil(len(ids) / count)
    return [ids[start:start + size] for start in range(0, len(ids), size)]


def _single(builder: PromptBuilder, document_ids: list[int], generate: Generate) -> Outcome:
    result = generate(builder.build(document_ids))
    return Outcome(result.text, result.prompt_tokens, len(result.token_ids))
