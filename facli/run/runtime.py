"""A planned, loaded model ready to generate: plan first, then load, then run the plan.

The runtime executes the plan it is given (device, dtype, TP tile, prefill chunk, KV placement)
and reports measured peak memory and time next to the plan's predictions.
"""

import dataclasses
import time
from dataclasses import dataclass

import torch

from facli.models.checkpoint import CheckpointReader
from facli.models.llama import CausalLM
from facli.models.resolve import (
    ResolvedModel,
    check_context,
    resolve_device,
    resolve_model,
    tokenizer_for,
)
from facli.models.tokenizer import StopText, TextStream
from facli.offload.build import build_kv_store
from facli.parallel.comm import broadcast_tokens
from facli.parallel.context import SINGLE_PROCESS, ParallelContext
from facli.planner.hardware import HardwareSpec
from facli.planner.plan import Plan
from facli.planner.search import largest_resident_batch, predict_prompt
from facli.run.batching import BatchedEngine, BatchStats, RowRequest
from facli.run.engine import Engine, TokenRun
from facli.run.placement import (
    hardware_for,
    plan_options,
    plan_run,
    tensor_parallel_settings,
    weight_dtype,
)
from facli.run.sampling import Sampler, SamplingParams
from facli.run_options import RunOptions


@dataclass
class GenerationResult:
    token_ids: list[int]
    text: str
    prompt_tokens: int
    ttft_s: float
    # None: not measured (fewer than two decode steps ran, or a row of generate_rows, whose
    # batch shares its steps)
    decode_tokens_per_s: float | None
    peak_gpu_bytes: int | None
    finish_reason: str  # "eos" | "length" | "stop"
    decode_steps: int = 0  # the timed decode steps (after the first) and their seconds
    decode_s: float = 0.0


class Runtime:
    """A loaded model, its tokenizer, its KV store and the engine that runs them, per a Plan.

    The caller has checked the run and planned it (facli.run.placement.plan_run): the runtime
    executes `plan`, made on `hardware` (the spec detected before anything was loaded;
    tensor-parallel ranks get their parent's, so no rank touches another's GPU). Re-plans for
    another shape or decode mode go through plan_run with `options`.
    """

    def __init__(self, resolved: ResolvedModel, options: RunOptions,
                 parallel: ParallelContext = SINGLE_PROCESS, tokenizer=None, *,
                 plan: Plan, hardware: HardwareSpec):
        self.resolved, self.options = resolved, options
        self.config = resolved.config
        self.device = resolve_device(options.device, parallel)
        self.hardware = hardware
        self.plan = plan
        self.parallel = parallel.with_settings(tensor_parallel_settings(self.plan))
        self.ctx = plan.ctx
        self.asked_decode_mode = options.decode_mode  # "auto" picks one per prompt
        self.dtype = weight_dtype(self.plan)
        self.prefill_chunk = self.plan.prefill_chunk
        self.tokenizer = tokenizer or tokenizer_for(resolved)
        started = time.perf_counter()
        self.model = CausalLM(self.config, dtype=self.dtype, device=self.device, parallel=self.parallel)
        if resolved.synthetic:
            randomize_weights(self.model, seed=parallel.rank)
        else:
            self.model.load(CheckpointReader(resolved.path))
        self.model.pack_on_cpu()
        self.load_s = time.perf_counter() - started
        self._build_engine()

    def _replanned(self, options: RunOptions, ctx: int, rows: int) -> Plan:
        return plan_run(self.config, self.resolved.name, self.hardware, options, ctx=ctx,
                        world_size=self.parallel.world_size, batch=rows)

    def resident_rows(self, ctx: int) -> int:
        """The most prompts of `ctx` tokens that this runtime can decode together: their plan
        keeps the whole KV cache on the devices (planner.search.largest_resident_batch, with
        this runtime's choices)."""
        options = plan_options(self.resolved.name, dataclasses.replace(self.options, force=False),
                               self.parallel.world_size)
        return largest_resident_batch(self.config, self.hardware, ctx, options)

    @property
    def rows(self) -> int:
        """Prompts the KV cache holds at once: generate_rows decodes them together."""
        return self.plan.batch

    def _build_engine(self) -> None:
        self.kv = self.engine = self.batched = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.kv = build_kv_store(self.plan, self.config, self.parallel.world_size, self.device)
        shared = dict(token_sync=self._token_sync(), use_graphs=self.options.cuda_graphs)
        single = self.kv if self.rows == 1 else self.kv.row(0)
        self.engine = Engine(self.model, single, prefill_chunk=self.prefill_chunk, **shared)
        if self.rows > 1:
            self.batched = BatchedEngine(self.model, self.kv, prefill_chunk=self.prefill_chunk,
                                         **shared)

    def _token_sync(self):
        if not self.parallel.is_distributed:
            return None
        return lambda tokens: broadcast_tokens(tokens, self.parallel)

    def reconfigure(self, *, decode_mode: str | None = None, prefill_chunk: int | None = None) -> None:
        """Run on with another decode mode (re-planned, KV store rebuilt; "auto" lets each
        prompt pick again) or prefill chunk."""
        if decode_mode is not None:
            self.asked_decode_mode = decode_mode
        if decode_mode is not None and decode_mode != self.plan.decode_mode:
            options = dataclasses.replace(self.options, decode_mode=decode_mode,
                                          prefill_chunk=prefill_chunk or self.prefill_chunk)
            self.plan = self._replanned(options, self.ctx, self.rows)
            self._build_engine()
        if prefill_chunk is not None:
            self.prefill_chunk = self.engine.prefill_chunk = prefill_chunk
            if self.batched is not None:
                self.batched.prefill_chunk = prefill_chunk

    def reshape(self, *, ctx: int | None = None, rows: int | None = None) -> None:
        """Re-plan for `rows` prompts of `ctx` tokens at once (None: as now) and rebuild the KV
        store; weights stay. Nothing happens when both are as now. The caller has checked that
        the model serves `ctx` (facli.models.resolve.check_context)."""
        ctx, rows = ctx or self.ctx, rows or self.rows
        if (ctx, rows) != (self.ctx, self.rows):
            self._replan(ctx, rows)

    def _replan(self, ctx: int, rows: int) -> None:
        """A plan that raises leaves the runtime as it was; a store that cannot be built leaves
        it without one, to be reshaped again."""
        self.plan = self._replanned(self.options, ctx, rows)
        self.ctx, self.prefill_chunk = ctx, self.plan.prefill_chunk
        self._build_engine()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text).input_ids

    def generate(self, prompt_ids: list[int], *, max_new_tokens: int, sampling: SamplingParams,
                 prefill_chunk: int | None = None, on_text=None, on_progress=None,
                 ignore_eos: bool = False, stop: tuple[str, ...] = (),
                 prediction=None) -> GenerationResult:
        """A prompt the caller has checked: non-empty and shorter than the context
        (facli.models.resolve.check_prompt_fits). ignore_eos: decode all max_new_tokens even past
        an EOS token (benchmarks). stop: end at the first of these strings; the text ends before
        it (its tokens stay in token_ids). prediction: the time model's for this prompt on this
        plan (predict_prompt), where the caller has it."""
        if prefill_chunk is not None:
            self.reconfigure(prefill_chunk=prefill_chunk)
        self.decode_for_prompt(len(prompt_ids), prediction)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        stream, stopper = TextStream(self.tokenizer), StopText(stop)

        def on_token(token_id: int) -> bool:
            piece = stopper.push(stream.push(token_id))
            if piece and on_text is not None:
                on_text(piece)
            return stopper.stopped

        run = self.engine.generate(
            prompt_ids, max_new_tokens=max_new_tokens, sampler=Sampler(sampling, self.device),
            eos_ids=() if ignore_eos else self.eos_ids(), on_token=on_token, on_progress=on_progress,
        )
        peak = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None
        tail = stopper.flush()
        if tail and on_text is not None:
            on_text(tail)
        return GenerationResult(
            token_ids=run.token_ids, text=stopper.text if stop else stream.text(),
            prompt_tokens=len(prompt_ids),
            ttft_s=run.timings.ttft_s, decode_tokens_per_s=run.timings.decode_tokens_per_s,
            peak_gpu_bytes=peak, finish_reason=run.finish_reason,
            decode_steps=run.timings.decode_steps, decode_s=run.timings.decode_s,
        )

    def generate_rows(self, next_request, on_done, *, sampling: SamplingParams,
                      ignore_eos: bool = False, on_progress=None) -> BatchStats:
        """Run prompts from next_request() (a RowRequest, or None when there is none for now;
        each checked by the caller, as for `generate`) in the KV cache's rows, decoded together;
        on_done(request, GenerationResult) as each one ends; on_progress(prefilled, decoded) as
        each prefill chunk and decode step runs (BatchedEngine.run). Needs a plan of two rows or
        more; with one, call `generate` per prompt."""
        assert self.batched is not None, "generate_rows needs a runtime with batch > 1"
        eos_ids = () if ignore_eos else self.eos_ids()

        def finished(request: RowRequest, run: TokenRun) -> None:
            on_done(request, GenerationResult(
                token_ids=run.token_ids, prompt_tokens=len(request.prompt_ids),
                text=self.tokenizer.decode(run.token_ids, skip_special_tokens=True),
                ttft_s=run.timings.ttft_s, decode_tokens_per_s=None, peak_gpu_bytes=None,
                finish_reason=run.finish_reason))

        return self.batched.run(next_request, finished, sampling=sampling, eos_ids=eos_ids,
                                on_progress=on_progress)

    def decode_for_prompt(self, prompt_tokens: int, prediction=None):
        """Set the host layers' decode mode (when the mode asked is "auto") and split share that
        the time model finds fastest for this prompt on the plan's KV store; the plan's are for a
        prompt that fills the context. Returns the prediction (`prediction` where given, the
        predict_prompt of this prompt; None without host layers).

        While the staging slots keep every host layer's rows (packed), no mode is used: the one
        set is the fastest just past the packed length, for generation that goes beyond it."""
        if not self.plan.host.layers:
            return None
        chosen = after = prediction or self.predict_prompt(prompt_tokens)
        packed_rows = self.plan.host.packed_prompt_tokens
        if chosen.packed and packed_rows < self.plan.ctx:
            after = self.predict_prompt(packed_rows + 1)
        self.kv.decode_mode, self.kv.cpu_share = after.decode_mode, after.cpu_share
        return chosen

    def predict_prompt(self, prompt_tokens: int):
        """The time model's figures for a prompt of this length on the plan's placement, in the
        decode mode asked or (with "auto") the fastest for it: planner.search.PromptPrediction."""
        return predict_prompt(self.config, self.hardware, self.plan, prompt_tokens,
                              choose_mode=self.asked_decode_mode == "auto")

    def eos_ids(self) -> tuple[int, ...]:
        ids = set(self.config.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return tuple(sorted(ids))


@torch.no_grad()
def randomize_weights(model: CausalLM, seed: int) -> None:
    """Normal(0, 0.02) matrices and unit norms, generated on the model's device."""
    generator = torch.Generator(device=model.device).manual_seed(seed)
    for name, param in model.named_parameters():
        if param.dim() == 1:
            param.fill_(1.0 if name.endswith("norm.weight") else 0.0)
        else:
            param.normal_(0.0, 0.02, generator=generator)


def load_runtime(options: RunOptions, resolved: ResolvedModel | None = None,
                 parallel: ParallelContext = SINGLE_PROCESS) -> Runtime:
    """Check, plan and load in one call, for scripts and tests: `options.batch` rows of
    `options.ctx` tokens (both given) on this machine; the commands do these steps themselves."""
    assert options.ctx and options.batch, "load_runtime needs options.ctx and options.batch"
    resolved = resolved or resolve_model(options.model)
    check_context(resolved.config, options.ctx, options.allow_ctx_extension, warn=False)
    hardware = hardware_for(resolve_device(options.device, parallel), options.hardware)
    plan = plan_run(resolved.config, resolved.name, hardware, options, ctx=options.ctx,
                    world_size=parallel.world_size, batch=options.batch)
    return Runtime(resolved, options, parallel, plan=plan, hardware=hardware)
