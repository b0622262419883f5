"""Everything of a summarize run before the weights load: the request, the corpus read,
tokenized and planned, the documents still to do, and their row groups with each group's memory
plan. The run (facli.summarize.run) and its forecast (facli.summarize.forecast) both start here.
"""

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch

from facli.errors import FacliError
from facli.parallel.comm import broadcast_tokens
from facli.parallel.context import ParallelContext
from facli.planner.search import MOST_ROWS, check_decode_mode
from facli.resolve import ResolvedModel, check_context, resolve_device, resolve_model
from facli.runtime import check_kv_dtype
from facli.sampling import SamplingParams
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
from facli.tokenizer import load_tokenizer


@dataclass(frozen=True)
class SummarizeRequest:
    inputs: tuple[Path, ...]
    out: Path
    model: str | None = None
    ctx: int | None = None  # None: the model's max_position_embeddings
    max_new_tokens: int = 256
    prompt_template: Path | None = None
    strategy: Strategy = Strategy.FIT
    device: str | None = None
    dtype: str = "auto"
    devices: int = 1
    sampling: SamplingParams = field(
        default_factory=lambda: SamplingParams(repetition_penalty=SUMMARY_REPETITION_PENALTY))
    retry_failed: bool = False
    allow_ctx_extension: bool = False
    kv_dtype: str = "auto"  # auto (the weights'), bf16, fp16, fp32 or fp8
    decode_mode: str = "auto"  # for host-resident KV: auto, prefetch, cpu or split
    allreduce_tile_tokens: int | None = None  # None: the plan's
    batch: int | None = None  # documents decoded together; None: as many as the GPUs hold
    hardware: object = None  # the HardwareSpec to plan on; None detects it (summarize_hardware)

    def __post_init__(self):
        check_output_path(self.out)  # before anything is read, locked or created
        check_kv_dtype(self.kv_dtype)
        check_decode_mode(self.decode_mode)
        if self.max_new_tokens <= 0:
            raise FacliError(f"expected --max-new-tokens > 0, got {self.max_new_tokens}")
        if self.devices < 1:
            raise FacliError(f"expected --devices >= 1, got {self.devices}")
        if self.batch is not None and self.batch < 1:
            raise FacliError(f"expected --batch >= 1, got {self.batch}")


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
        request = dataclasses.replace(request, hardware=summarize_hardware(request.device))
    files = discover(request.inputs, exclude=[request.out])
    template = read_template(request.prompt_template)
    resolved = resolve_model(request.model)
    tokenizer = load_tokenizer(resolved.path)
    return request, resolved, tokenizer, prepare_corpus(request, files, template, resolved,
                                                         tokenizer, log)


def prepare_corpus(request: SummarizeRequest, files: list[SourceFile], template: str | None,
                   resolved: ResolvedModel, tokenizer, log=print) -> Corpus:
    """Read and tokenize every document and plan the context, before any weights load."""
    ctx = request.ctx or resolved.config.max_position_embeddings
    check_context(resolved.config, ctx, request.allow_ctx_extension)
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
    runtime_ctx, settings = corpus.plan.runtime_ctx, corpus.settings
    if request.batch is not None:
        return [RowGroup(runtime_ctx, request.batch, tuple(pending))]
    buckets = length_buckets(pending, settings, runtime_ctx)
    resident = [choose_rows(resolved.config, ctx, request.hardware, model_name=resolved.name,
                            max_new_tokens=request.max_new_tokens, devices=request.devices,
                            dtype=request.dtype, kv_dtype=request.kv_dtype)
                for ctx, _ in buckets]
    if parallel.is_distributed:
        agreed = torch.tensor(resident, dtype=torch.long,
                              device=resolve_device(request.device, parallel))
        resident = broadcast_tokens(agreed, parallel).tolist()
    return merge_buckets(buckets, resident, settings, MOST_ROWS)


def group_plan(request: SummarizeRequest, resolved: ResolvedModel, group: RowGroup):
    """The memory plan for the group's rows at its context (facli.planner.search)."""
    return plan_memory(resolved.config, group.ctx, request.hardware, batch=group.rows,
                       model_name=resolved.name, max_new_tokens=request.max_new_tokens,
                       devices=request.devices, dtype=request.dtype,
                       kv_dtype=request.kv_dtype, decode_mode=request.decode_mode,
                       allreduce_tile_tokens=request.allreduce_tile_tokens,
                       rows_hint=request.batch is None)
