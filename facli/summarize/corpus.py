"""Everything of a summarize run before the weights load: the request, the corpus read,
tokenized and planned, the documents still to do, and their row groups with each group's memory
plan. The run (facli.summarize.run) and its forecast (facli.summarize.forecast) both start here.
"""

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch

from facli.errors import FacliError
from facli.models.resolve import ResolvedModel, check_context, resolve_device, resolve_model
from facli.models.tokenizer import load_tokenizer
from facli.parallel.comm import broadcast_tokens
from facli.parallel.context import ParallelContext
from facli.planner.search import MOST_ROWS
from facli.run.sampling import SamplingParams
from facli.run_options import RunOptions
from facli.summarize.documents import SourceFile, discover, read_documents
from facli.summarize.files import check_output_path
from facli.summarize.job import JobSettings
from facli.summarize.output import ExistingResults
from facli.summarize.planning import (
    CorpusPlan,
    PreparedDocument,
    choose_rows,
    plan_corpus,
    plan_memory,
    summarize_hardware,
    tokenize,
)
from facli.summarize.prompting import SUMMARY_REPETITION_PENALTY, make_prompts, read_template
from facli.summarize.row_groups import RowGroup, length_buckets, merge_buckets
from facli.summarize.strategies import Budget, Strategy


def _run_defaults() -> RunOptions:
    return RunOptions(batch=None)


@dataclass(frozen=True)
class SummarizeRequest:
    """A summarize run. run.ctx None: the model's max_position_embeddings; run.batch: documents
    decoded together, None: as many as the GPUs hold."""

    inputs: tuple[Path, ...]
    out: Path
    run: RunOptions = field(default_factory=_run_defaults)
    max_new_tokens: int = 256
    prompt_template: Path | None = None
    strategy: Strategy = Strategy.FIT
    sampling: SamplingParams = field(
        default_factory=lambda: SamplingParams(repetition_penalty=SUMMARY_REPETITION_PENALTY))
    retry_failed: bool = False
    hardware: object = None  # the HardwareSpec to plan on; None detects it (summarize_hardware)

    def __post_init__(self):
        check_output_path(self.out)  # before anything is read, locked or created
        if self.max_new_tokens <= 0:
            raise FacliError(f"expected --max-new-tokens > 0, got {self.max_new_tokens}")


@dataclass(frozen=True)
class Corpus:
    prepared: list[PreparedDocument]
    settings: JobSettings
    plan: CorpusPlan
    template: str | None


def open_corpus(request: SummarizeRequest, log=print):
    """Everything before the weights: (the request with its hardware spec, the model, its
    tokenizer, the corpus read, tokenized and planned)."""
    if request.hardware is None:
        request = dataclasses.replace(request, hardware=summarize_hardware(request.run.device))
    files = discover(request.inputs, exclude=[request.out])
    template = read_template(request.prompt_template)
    resolved = resolve_model(request.run.model)
    tokenizer = load_tokenizer(resolved.path)
    return request, resolved, tokenizer, prepare_corpus(request, files, template, resolved,
                                                         tokenizer, log)


def prepare_corpus(request: SummarizeRequest, files: list[SourceFile], template: str | None,
                   resolved: ResolvedModel, tokenizer, log=print) -> Corpus:
    """Read and tokenize every document and plan the context, before any weights load."""
    ctx = request.run.ctx or resolved.config.max_position_embeddings
    check_context(resolved.config, ctx, request.run.allow_ctx_extension)
    prompts = make_prompts(tokenizer, template)
    budget = Budget(ctx=ctx, max_new_tokens=request.max_new_tokens)
    prepared = tokenize(read_documents(files, log), prompts)
    plan = plan_corpus(prepared, prompts, budget, request.strategy)
    settings = JobSettings(request.strategy, budget, prompts, request.sampling)
    return Corpus(prepared, settings, plan, template)


def select_pending(prepared: list[PreparedDocument], existing: ExistingResults,
                   retry_failed: bool) -> tuple[list[PreparedDocument], int]:
    """Documents without a record, plus failed ones with --retry-failed; and how many are skipped."""
    done = existing.ids_with_status("ok")
    if not retry_failed:
        done |= existing.ids_with_status("failed")
    pending = [p for p in prepared if p.document.id not in done]
    return pending, len(prepared) - len(pending)


def corpus_row_groups(request: SummarizeRequest, resolved: ResolvedModel, corpus: Corpus,
                      pending: list[PreparedDocument], parallel: ParallelContext) -> list[RowGroup]:
    """With --batch, every document in that many rows of the planned context. Otherwise the
    documents grouped by length (facli.summarize.row_groups), each group in the most rows that
    fit beside the weights at its context; every rank takes rank 0's rows."""
    runtime_ctx, settings, run = corpus.plan.runtime_ctx, corpus.settings, request.run
    if run.batch is not None:
        return [RowGroup(runtime_ctx, run.batch, tuple(pending))]
    buckets = length_buckets(pending, settings, runtime_ctx)
    resident = [choose_rows(resolved.config, ctx, request.hardware, model_name=resolved.name,
                            max_new_tokens=request.max_new_tokens, devices=run.devices,
                            dtype=run.dtype, kv_dtype=run.kv_dtype)
                for ctx, _ in buckets]
    if parallel.is_distributed:
        agreed = torch.tensor(resident, dtype=torch.long,
                              device=resolve_device(run.device, parallel))
        resident = broadcast_tokens(agreed, parallel).tolist()
    return merge_buckets(buckets, resident, settings, MOST_ROWS)


def group_plan(request: SummarizeRequest, resolved: ResolvedModel, group: RowGroup):
    """The memory plan for the group's rows at its context (facli.planner.search)."""
    run = request.run
    return plan_memory(resolved.config, group.ctx, request.hardware, batch=group.rows,
                       model_name=resolved.name, max_new_tokens=request.max_new_tokens,
                       devices=run.devices, dtype=run.dtype, kv_dtype=run.kv_dtype,
                       decode_mode=run.decode_mode,
                       allreduce_tile_tokens=run.allreduce_tile_tokens,
                       rows_hint=run.batch is None)
