"""A summarize run from start to end: corpus and plan (facli.summarize.corpus), resume state,
manifest, model, loop.

Everything up to loading the model is cheap (tokenizer only), so mistakes and the plan show
before any weights are read. Every rank runs this; only the writer rank touches files.
"""

import dataclasses
import sys
import time
from contextlib import nullcontext

import torch

from facli.errors import FacliError
from facli.models.resolve import ResolvedModel, resolve_device
from facli.parallel.comm import all_reduce_sum, barrier
from facli.parallel.context import SINGLE_PROCESS, ParallelContext
from facli.parallel.launch import launch
from facli.run.placement import plan_run
from facli.run.runtime import Runtime
from facli.summarize import manifest as manifests
from facli.summarize.corpus import (
    Corpus,
    SummarizeRequest,
    corpus_row_groups,
    open_corpus,
    select_pending,
)
from facli.summarize.forecast import group_forecasts, predicted_line
from facli.summarize.interrupt import StopRequest
from facli.summarize.job import JobSettings, JobSummary, run_documents
from facli.summarize.output import ExistingResults, ResultWriter, check_writable, read_results
from facli.summarize.planning import PreparedDocument
from facli.summarize.row_groups import RowGroup


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
            runtime = _load(request, resolved, tokenizer, groups[0], parallel)
            if writer is not None:
                _prepare_output(writer, existing, pending, request.retry_failed)
            summary = _run_groups(runtime, groups, writer, corpus.settings, parallel, stop,
                                  fall_back=request.run.batch is None, log=log)
        summary.skipped = skipped
        summary.skipped_ok = len(existing.ids_with_status("ok")
                                 & {p.document.id for p in corpus.prepared})
        summary.seconds = time.perf_counter() - started
        if writer is not None and (writer.written or request.out.exists()):
            manifests.finish_run(entry, summary.as_dict())
            manifests.write_manifest(path, manifest)
    log(summary.line())
    return summary


def summarize_on_rank(parallel: ParallelContext, request: SummarizeRequest) -> JobSummary:
    """`run_summarize` in the argument order of facli.parallel.launch."""
    return run_summarize(request, parallel)


def run_on_ranks(request: SummarizeRequest) -> JobSummary:
    """`facli summarize`: run_summarize on request.run.devices ranks (facli.parallel.launch,
    which starts none for one); rank 0's summary."""
    device_type = resolve_device(request.run.device).type
    return launch(summarize_on_rank, (request,), world_size=request.run.devices,
                  device_type=device_type)


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


def _load(request: SummarizeRequest, resolved: ResolvedModel, tokenizer, group: RowGroup,
          parallel: ParallelContext) -> Runtime:
    """The model, planned for one row at the first group's context (within the --ctx that
    open_corpus checked); _run_groups then shapes it for each group."""
    plan = plan_run(resolved.config, resolved.name, request.hardware, request.run, ctx=group.ctx,
                    world_size=parallel.world_size)
    return Runtime(resolved, request.run, parallel, tokenizer, plan=plan,
                   hardware=request.hardware)


def _prepare_output(writer: ResultWriter, existing: ExistingResults,
                    pending: list[PreparedDocument], retry_failed: bool) -> None:
    """Cut a partial last line; with --retry-failed, drop the failed records about to be redone."""
    writer.repair(existing)
    if retry_failed:
        writer.drop(existing.ids_with_status("failed") & {p.document.id for p in pending})


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
        "device": request.run.device, "devices": request.run.devices,
        "rows": [{"ctx": g.ctx, "rows": g.rows, "documents": len(g.items)} for g in groups],
        "retry_failed": request.retry_failed,
    })
    return manifest, entry


def _result_settings(request: SummarizeRequest, template: str | None) -> dict:
    """The settings that decide what a summary is; a resumed run must match them."""
    return {
        **dataclasses.asdict(request.sampling),
        "max_new_tokens": request.max_new_tokens,
        "dtype": request.run.dtype,
        "kv_dtype": request.run.kv_dtype,
        "prompt_template": manifests.text_hash(template),
    }


def _logger(enabled: bool):
    def log(message: str) -> None:
        if enabled:
            print(message, file=sys.stderr, flush=True)

    return log
