"""The corpus plan: tokenize every document before the model is loaded and size the context."""

import math
from dataclasses import asdict, dataclass

from facli.errors import FacliError
from facli.models.recipe_loader import resolve_model_config
from facli.planner.hardware import detect_hardware, load_hardware
from facli.planner.search import PlanOptions, largest_resident_batch, plan, with_fp8_rows_hint
from facli.run.placement import planned_devices
from facli.summarize.documents import Document
from facli.summarize.prompting import Prompts
from facli.summarize.strategies import Budget, Strategy

@dataclass(frozen=True)
class PreparedDocument:
    """A document and its tokens (None for a document that cannot be used)."""

    document: Document
    ids: tuple[int, ...] | None


@dataclass(frozen=True)
class CorpusPlan:
    documents: int
    unusable: int  # unreadable, not UTF-8, empty
    fit: int  # usable documents whose whole prompt fits in ctx
    longest_prompt_tokens: int
    ctx: int
    runtime_ctx: int  # the context the model is loaded with: enough for the longest prompt run

    def as_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        usable = self.documents - self.unusable
        return (
            f"{self.documents} documents ({self.unusable} unusable); {self.fit} of {usable} fit "
            f"in --ctx {self.ctx}; longest prompt {self.longest_prompt_tokens} tokens; "
            f"loading the model with a {self.runtime_ctx}-token context"
        )


def tokenize(documents: list[Document], prompts: Prompts) -> list[PreparedDocument]:
    return [
        PreparedDocument(doc, None if doc.text is None else tuple(prompts.summarize.encode(doc.text)))
        for doc in documents
    ]


def plan_corpus(prepared: list[PreparedDocument], prompts: Prompts, budget: Budget,
                strategy: Strategy) -> CorpusPlan:
    """Count what fits, and choose the smallest context that runs every document the strategy will
    run: with `fit` that is the longest fitting prompt, otherwise up to `ctx`."""
    check_budget(prompts, budget)
    limit = budget.document_tokens(prompts.summarize)
    lengths = [len(p.ids) for p in prepared if p.ids is not None]
    fitting = [n for n in lengths if n <= limit]
    runs = fitting if strategy is Strategy.FIT else lengths
    overhead = prompts.summarize.overhead
    longest_run = min(max(runs, default=0), limit) + overhead
    return CorpusPlan(
        documents=len(prepared),
        unusable=len(prepared) - len(lengths),
        fit=len(fitting),
        longest_prompt_tokens=max(lengths, default=0) + overhead,
        ctx=budget.ctx,
        runtime_ctx=min(budget.ctx, longest_run + budget.max_new_tokens),
    )


def first_prompts(pending: list[PreparedDocument], prompts: Prompts, budget: Budget,
                  strategy: Strategy) -> int:
    """How many prompts the usable documents start with: one each, and with map-reduce one per
    chunk of a document longer than the context."""
    usable = [len(p.ids) for p in pending if p.ids is not None]
    if strategy is not Strategy.MAP_REDUCE:
        return len(usable)
    limit = budget.document_tokens(prompts.summarize)
    return sum(max(1, math.ceil(length / limit)) for length in usable)


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


def check_budget(prompts: Prompts, budget: Budget) -> None:
    for builder in (prompts.summarize, prompts.combine):
        if budget.document_tokens(builder) < 1:
            raise FacliError(
                f"expected --ctx {budget.ctx} to hold the {builder.overhead}-token prompt template "
                f"and --max-new-tokens {budget.max_new_tokens}, got no room for the document; "
                "raise --ctx or lower --max-new-tokens"
            )


def summarize_hardware(device: str | None):
    """This machine as the planner sees it (planner.hardware.detect_hardware), without GPUs for
    --device cpu. Detected once, before any rank starts, and shared by all of them."""
    return detect_hardware(gpus=device != "cpu")


def hardware_spec(recipe: str, device: str | None):
    """The spec to plan on: a named recipe (--hardware with --plan-only), else this machine
    (summarize_hardware)."""
    if recipe == "auto":
        return summarize_hardware(device)
    return load_hardware(recipe)


def auto_devices(model: str | None, ctx: int | None, hardware, *, dtype: str, kv_dtype: str,
                 decode_mode: str, batch: int | None) -> int:
    """`--devices auto`: the planner's degree for the model's config at `ctx` (None: its trained
    length), read without weights."""
    name, config = resolve_model_config(model)
    return planned_devices(config, name, hardware, ctx or config.max_position_embeddings,
                           dtype=dtype, kv_dtype=kv_dtype, decode_mode=decode_mode,
                           batch=batch or 1)


def plan_memory(config, ctx: int, hardware, *, model_name: str, max_new_tokens: int,
                devices: int, dtype: str, kv_dtype: str = "auto", decode_mode: str = "auto",
                allreduce_tile_tokens: int | None = None, batch: int = 1,
                rows_hint: bool = False):
    """The memory plan (facli.planner.search) for `batch` of the longest prompt, before any
    weights load; raises OutOfMemoryPlanError when nothing fits. rows_hint: rows chosen by the
    planner, whose plan names --kv-dtype fp8 where it holds clearly faster rows
    (planner.search.with_fp8_rows_hint)."""
    options = _plan_options(model_name, max_new_tokens, devices, dtype, kv_dtype, decode_mode,
                            allreduce_tile_tokens)
    found = plan(config, hardware, ctx, batch, options)
    return with_fp8_rows_hint(config, hardware, found, options) if rows_hint else found


def choose_rows(config, ctx: int, hardware, *, model_name: str, max_new_tokens: int,
                devices: int, dtype: str, kv_dtype: str) -> int:
    """How many prompts of `ctx` tokens to decode together when --batch is not given: the most,
    up to planner.search.MOST_ROWS, whose KV cache fits in device memory beside the weights
    (largest_resident_batch). 48 rows ran 7.4x one at a time on short documents
    (docs/performance.md, "facli summarize")."""
    options = _plan_options(model_name, max_new_tokens, devices, dtype, kv_dtype)
    return largest_resident_batch(config, hardware, ctx, options)


def _plan_options(model_name, max_new_tokens, devices, dtype, kv_dtype, decode_mode="auto",
                  allreduce_tile_tokens=None):
    return PlanOptions(weight_dtype=dtype, kv_dtype=kv_dtype, decode_mode=decode_mode,
                       allreduce_tile_tokens=allreduce_tile_tokens, devices=devices,
                       new_tokens=max_new_tokens, model_name=model_name)
