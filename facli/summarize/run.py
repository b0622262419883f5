"""A summarize run from start to end: corpus, plan, resume state, manifest, model, loop.

Everything up to loading the model is cheap (tokenizer only), so mistakes and the plan show
before any weights are read. Every rank runs this; only the writer rank touches files.
"""

import dataclasses
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from facli.errors import FacliError
from facli.planner.search import MOST_ROWS, check_decode_mode
from facli.parallel.comm import all_reduce_sum, barrier, broadcast_tokens
from facli.parallel.context import SINGLE_PROCESS, ParallelContext
from facli.resolve import ResolvedModel, check_context, resolve_device, resolve_model
from facli.runtime import Runtime, RuntimeOptions, check_kv_dtype
from facli.sampling import SamplingParams
from facli.summarize import manifest as manifests
from facli.summarize.documents import SourceFile, discover, read_documents
from facli.summarize.files import check_output_path
from facli.summarize.forecast import GroupForecast, forecast_group, predicted_line
from facli.summarize.interrupt import StopRequest
from facli.summarize.job import JobSettings, JobSummary, run_documents
from facli.summarize.output import ExistingResults, ResultWriter, check_writable, read_results
from facli.summarize.planning import (
    CorpusPlan,
    PreparedDocument,
    choose_rows,
    plan_corpus,
    plan_memory,
    summarize_hardware,
    tokenize,
)
from facli.summarize.row_groups import RowGroup, length_buckets, merge_buckets
from facli.summarize.prompting import SUMMARY_REPETITION_PENALTY, make_prompts, read_template
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


def run_summarize(request: SummarizeRequest, parallel: ParallelContext = SINGLE_PROCESS,
                  stop: StopRequest | None = None) -> JobSummary:
    """Summarize every document not already in the output; returns this run's counts.

    Every tensor-parallel rank calls this with its own `parallel`; rank 0 alone writes files.
    Nothing is written before the model has loaded and a document is about to be recorded
    (or the output repaired): a run that fails before leaves no output, manifest or lock."""
    started = time.perf_counter()
    log = _logger(parallel.is_writer)
    if parallel.is_writer:
        check_writable(request.out)
    # The output's lock before the corpus is read and tokenized: a second run on the same
    # output stops at once, and so does an output that is not summarize's results.
    writer = ResultWriter(request.out) if parallel.is_writer else None
    with writer or nullcontext():
        existing = read_results(request.out)
        request, resolved, tokenizer, corpus = open_corpus(request, log)
        log(f"facli: corpus: {corpus.plan.describe()}")
        pending, skipped = select_pending(corpus.prepared, existing, request.retry_failed)
        barrier(parallel)  # every rank has read the output before rank 0 changes it
        groups = corpus_row_groups(request, resolved, corpus, pending, parallel) if pending else []
        forecasts = group_forecasts(request, resolved, corpus, groups) if writer else []
        memory = forecasts[-1].plan if forecasts else None  # the widest group's
        if memory is not None:
            log(f"facli: {memory.summary_line()}")
            for line in memory.hints:
                log(f"facli: {line}")
        if any(group.rows > 1 for group in groups):
            log(f"facli: rows decoded together (--batch): {'; then '.join(g.describe() for g in groups)}"
                "; records come in the order documents finish")
        if forecasts:
            log(f"facli: {predicted_line(forecasts)}")
        manifest, entry = _open_manifest(request, resolved, corpus, memory, groups)
        path = manifests.manifest_path(request.out)
        if writer is not None:
            writer.before_first_write = lambda: manifests.write_manifest(path, manifest)
        log(f"facli: {len(pending)} to summarize, {skipped} already in {request.out}")
        summary = JobSummary()
        if groups:
            runtime = Runtime(resolved, _runtime_options(request, groups[0]), parallel, tokenizer,
                              hardware=request.hardware)
            if writer is not None:
                _prepare_output(writer, existing, pending, request.retry_failed)
            summary = _run_groups(runtime, groups, writer, corpus.settings, parallel, stop,
                                  fall_back=request.batch is None, log=log)
        summary.skipped = skipped
        summary.skipped_ok = len(existing.ids_with_status("ok")
                                 & {p.document.id for p in corpus.prepared})
        summary.seconds = time.perf_counter() - started
        if writer is not None and (writer.written or request.out.exists()):
            manifests.finish_run(entry, summary.as_dict())
            manifests.write_manifest(path, manifest)
    log(summary.line())
    return summary


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


def summarize_on_rank(parallel: ParallelContext, request: SummarizeRequest) -> JobSummary:
    """`run_summarize` in the argument order of facli.parallel.launch."""
    return run_summarize(request, parallel)


def _run_groups(runtime, groups: list[RowGroup], writer: ResultWriter | None,
                settings: JobSettings, parallel: ParallelContext, stop: StopRequest | None, *,
                fall_back: bool, log) -> JobSummary:
    """Each group's documents with the runtime reshaped for the group (_shape)."""
    stop = stop or StopRequest(announce=parallel.is_writer)
    summary = JobSummary()
    with stop.installed():
        for index, group in enumerate(groups):
            _shape(runtime, group, fall_back, log)
            label = f"summarize {index + 1}/{len(groups)}" if len(groups) > 1 else "summarize"
            summary.merge(run_documents(runtime, list(group.items), writer, settings, stop=stop,
                                        is_writer=parallel.is_writer, label=label,
                                        agree=_stop_agreement(parallel, runtime.device)))
            if summary.interrupted:
                break
    return summary


def _shape(runtime, group: RowGroup, fall_back: bool, log) -> None:
    """The runtime for the group's rows and context. Rows chosen from the planner's figures
    (fall_back) become one row should the runtime's own plan for them keep part of the cache
    off the GPUs (it ranks placements its own way); --batch as asked is the user's to fix."""
    try:
        runtime.reshape(ctx=group.ctx, rows=group.rows)
    except FacliError as exc:
        if not fall_back or group.rows == 1:
            raise
        log(f"facli: {exc}; running these {len(group.items)} documents one at a time")
        runtime.reshape(ctx=group.ctx, rows=1)


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


def _runtime_options(request: SummarizeRequest, group: RowGroup) -> RuntimeOptions:
    """One row at the first group's context; _run_groups then shapes it for each group."""
    return RuntimeOptions(
        batch=1,
        model=request.model, device=request.device, dtype=request.dtype, ctx=group.ctx,
        devices=request.devices, allow_ctx_extension=request.allow_ctx_extension,
        kv_dtype=request.kv_dtype, decode_mode=request.decode_mode,
        allreduce_tile_tokens=request.allreduce_tile_tokens,
    )


def _prepare_output(writer: ResultWriter, existing: ExistingResults,
                    pending: list[PreparedDocument], retry_failed: bool) -> None:
    """Cut a partial last line; with --retry-failed, drop the failed records about to be redone."""
    writer.repair(existing)
    if retry_failed:
        writer.drop(existing.ids_with_status("failed") & {p.document.id for p in pending})


def group_forecasts(request: SummarizeRequest, resolved: ResolvedModel, corpus: Corpus,
                    groups: list[RowGroup]) -> list[GroupForecast]:
    """Each group's plan and predicted time (facli.summarize.forecast)."""
    return [forecast_group(group, group_plan(request, resolved, group), resolved.config,
                           request.hardware, corpus.settings) for group in groups]


def group_plan(request: SummarizeRequest, resolved: ResolvedModel, group: RowGroup):
    """The memory plan for the group's rows at its context (facli.planner.search)."""
    return plan_memory(resolved.config, group.ctx, request.hardware, batch=group.rows,
                       model_name=resolved.name, max_new_tokens=request.max_new_tokens,
                       devices=request.devices, dtype=request.dtype,
                       kv_dtype=request.kv_dtype, decode_mode=request.decode_mode,
                       allreduce_tile_tokens=request.allreduce_tile_tokens,
                       rows_hint=request.batch is None)


def _stop_agreement(parallel: ParallelContext, device):
    """With several ranks, all stop after the same document if any of them was asked to."""
    if not parallel.is_distributed:
        return None

    def agree(requested: bool) -> bool:
        flag = torch.tensor([1.0 if requested else 0.0], device=device)
        return bool(all_reduce_sum(flag, parallel).item() > 0)

    return agree


def _open_manifest(request: SummarizeRequest, resolved: ResolvedModel, corpus: Corpus, memory,
                   groups: list[RowGroup]) -> tuple[dict, dict]:
    """Check that the output was made with the same settings; the manifest with this run's
    start, written when the output first changes (ResultWriter.before_first_write)."""
    path = manifests.manifest_path(request.out)
    previous = manifests.read_manifest(path)
    model = {"name": resolved.name, "path": str(resolved.path),
             "config_hash": manifests.config_hash(resolved.config)}
    settings = _result_settings(request, corpus.template)
    manifests.check_resumable(previous, model, settings, request.out)
    plan = {**corpus.plan.as_dict(), "memory": memory.to_dict() if memory is not None else None}
    manifest = manifests.new_manifest(previous, model=model, settings=settings, plan=plan)
    entry = manifests.start_run(manifest, {
        "argv": sys.argv, "strategy": request.strategy.value, "ctx": corpus.plan.ctx,
        "device": request.device, "devices": request.devices,
        "rows": [{"ctx": g.ctx, "rows": g.rows, "documents": len(g.items)} for g in groups],
        "retry_failed": request.retry_failed,
    })
    return manifest, entry


def _result_settings(request: SummarizeRequest, template: str | None) -> dict:
    """The settings that decide what a summary is; a resumed run must match them."""
    return {
        **dataclasses.asdict(request.sampling),
        "max_new_tokens": request.max_new_tokens,
        "dtype": request.dtype,
        "kv_dtype": request.kv_dtype,
        "prompt_template": manifests.text_hash(template),
    }


def _logger(enabled: bool):
    def log(message: str) -> None:
        if enabled:
            print(message, file=sys.stderr, flush=True)

    return log
