"""A planned, loaded model ready to generate: plan first, then load, then run the plan.

The runtime executes the plan it is given (device, dtype, TP tile, prefill chunk, KV placement)
and reports measured peak memory and time next to the plan's predictions.
"""

import dataclasses
import time
from dataclasses import dataclass

import torch

from facli.checkpoint import CheckpointReader
from facli.batching import BatchedEngine, BatchStats, RowRequest
from facli.engine import Engine, TokenRun
from facli.errors import FacliError
from facli.model import CausalLM
from facli.offload.build import build_kv_store
from facli.planner.hardware import HardwareSpec
from facli.planner.plan import Plan
from facli.planner.search import largest_resident_batch, predict_prompt
from facli.parallel.comm import broadcast_tokens
from facli.parallel.context import SINGLE_PROCESS, ParallelContext
from facli.placement import (
    hardware_for,
    plan_run,
    run_options,
    tensor_parallel_settings,
    weight_dtype,
)
from facli.resolve import (
    DTYPES,
    ResolvedModel,
    check_context,
    check_prompt_fits,
    resolve_device,
    resolve_model,
    tokenizer_for,
)
from facli.sampling import Sampler, SamplingParams
from facli.tokenizer import StopText, TextStream
from facli.units import MAX_CTX, check_count

KV_DTYPES = ("auto", "bf16", "fp16", "fp32", "fp8")


def check_kv_dtype(kv_dtype: str) -> None:
    """Raise a FacliError unless `kv_dtype` is a --kv-dtype choice."""
    if kv_dtype not in KV_DTYPES:
        raise FacliError(f"expected --kv-dtype one of {', '.join(KV_DTYPES)}, got {kv_dtype!r}")


@dataclass(frozen=True)
class RuntimeOptions:
    model: str | None = None
    device: str | None = None
    dtype: str = "auto"
    ctx: int = 4096
    prefill_chunk: int | None = None
    devices: int = 1
    decode_mode: str = "auto"
    force: bool = False
    allow_ctx_extension: bool = False
    kv_dtype: str = "auto"
    hardware: str | None = None  # a hardware recipe name; None or "auto" detects this machine
    cuda_graphs: bool = True  # capture decode steps in CUDA graphs (False: eager, for debugging)
    allreduce_tile_tokens: int | None = None  # None: the plan's, from the hardware spec
    batch: int = 1  # rows of the KV cache: prompts decoded together (generate_rows)

    def __post_init__(self):
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise FacliError(f"expected --dtype one of auto, {', '.join(DTYPES)}, got {self.dtype!r}")
        check_kv_dtype(self.kv_dtype)
        if self.device not in (None, "cpu", "cuda"):
            raise FacliError(f"expected --device cpu or cuda, got {self.device!r}")
        check_count(self.ctx, "--ctx", low=0, high=MAX_CTX)  # 0: prompt + new tokens
        check_count(self.prefill_chunk, "--prefill-chunk", optional=True)
        check_count(self.allreduce_tile_tokens, "--allreduce-tile-tokens", optional=True)
        check_count(self.devices, "--devices")
        check_count(self.batch, "--batch")


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

    hardware: the spec to plan on, detected before anything is loaded (tensor-parallel ranks get
    their parent's, so no rank touches another's GPU). None detects it here.
    plan: the plan for options.ctx when the caller has made it already; None plans here.
    """

    def __init__(self, resolved: ResolvedModel, options: RuntimeOptions,
                 parallel: ParallelContext = SINGLE_PROCESS, tokenizer=None,
                 hardware: HardwareSpec | None = None, plan: Plan | None = None):
        check_context(resolved.config, options.ctx, options.allow_ctx_extension, warn=False)
        self.resolved, self.options = resolved, options
        self.config = resolved.config
        self.device = resolve_device(options.device, parallel)
        self.hardware = hardware or hardware_for(self.device, options.hardware)
        self.plan = plan or self._plan(options.ctx, parallel.world_size)
        self.parallel = parallel.with_settings(tensor_parallel_settings(self.plan))
        self.ctx = options.ctx
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
        self.load_s = time.perf_counter() - started
        self._build_engine()

    def _plan(self, ctx: int, world_size: int, **overrides) -> Plan:
        choices = dict(self._choices(), batch=self.options.batch)
        choices.update(overrides)
        return plan_run(self.config, self.resolved.name, self.hardware, ctx=ctx,
                        world_size=world_size, **choices)

    def _choices(self) -> dict:
        return dict(dtype=self.options.dtype, kv_dtype=self.options.kv_dtype,
                    prefill_chunk=self.options.prefill_chunk,
                    decode_mode=self.options.decode_mode, force=self.options.force,
                    allreduce_tile_tokens=self.options.allreduce_tile_tokens)

    def resident_rows(self, ctx: int) -> int:
        """The most prompts of `ctx` tokens that this runtime can decode together: their plan
        keeps the whole KV cache on the devices (planner.search.largest_resident_batch, with
        this runtime's choices)."""
        options = run_options(self.resolved.name, world_size=self.parallel.world_size,
                              **dict(self._choices(), force=False))
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
            self.plan = self._plan(self.ctx, self.parallel.world_size, decode_mode=decode_mode,
                                   prefill_chunk=prefill_chunk or self.prefill_chunk)
            self._build_engine()
        if prefill_chunk is not None:
            self.prefill_chunk = self.engine.prefill_chunk = prefill_chunk
            if self.batched is not None:
                self.batched.prefill_chunk = prefill_chunk

    def reshape(self, *, ctx: int | None = None, rows: int | None = None) -> None:
        """Re-plan for `rows` prompts of `ctx` tokens at once (None: as now) and rebuild the KV
        store; weights stay. Nothing happens when both are as now."""
        ctx, rows = ctx or self.ctx, rows or self.rows
        if (ctx, rows) != (self.ctx, self.rows):
            self._replan(ctx, rows)

    def _replan(self, ctx: int, rows: int) -> None:
        """A plan that raises leaves the runtime as it was; a store that cannot be built leaves
        it without one, to be reshaped again."""
        check_context(self.config, ctx, self.options.allow_ctx_extension, warn=False)
        plan = self._plan(ctx, self.parallel.world_size, batch=rows)
        self.options, self.plan = dataclasses.replace(self.options, batch=rows), plan
        self.ctx, self.prefill_chunk = ctx, plan.prefill_chunk
        self._build_engine()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text).input_ids

    def generate(self, prompt_ids: list[int], *, max_new_tokens: int, sampling: SamplingParams,
                 prefill_chunk: int | None = None, on_text=None, on_progress=None,
                 ignore_eos: bool = False, stop: tuple[str, ...] = ()) -> GenerationResult:
        """ignore_eos: decode all max_new_tokens even past an EOS token (benchmarks). stop: end
        at the first of these strings; the text ends before it (its tokens stay in token_ids)."""
        if not prompt_ids:
            raise FacliError("expected a non-empty prompt, got 0 tokens; give --prompt or --prompt-file")
        check_prompt_fits(len(prompt_ids), self.ctx)
        if prefill_chunk is not None:
            self.reconfigure(prefill_chunk=prefill_chunk)
        self.decode_for_prompt(len(prompt_ids))
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
        """Run prompts from next_request() (a RowRequest, or None when there is none for now)
        in the KV cache's rows, decoded together; on_done(request, GenerationResult) as each
        one ends; on_progress(prefilled, decoded) as each prefill chunk and decode step runs
        (BatchedEngine.run). Needs a runtime of two rows or more (RuntimeOptions.batch); with
        one, call `generate` per prompt."""
        assert self.batched is not None, "generate_rows needs a runtime with batch > 1"
        eos_ids = () if ignore_eos else self.eos_ids()

        def finished(request: RowRequest, run: TokenRun) -> None:
            on_done(request, GenerationResult(
                token_ids=run.token_ids, prompt_tokens=len(request.prompt_ids),
                text=self.tokenizer.decode(run.token_ids, skip_special_tokens=True),
                ttft_s=run.timings.ttft_s, decode_tokens_per_s=None, peak_gpu_bytes=None,
                finish_reason=run.finish_reason))

        def checked():
            request = next_request()
            if request is not None:
                check_prompt_fits(len(request.prompt_ids), self.ctx)
            return request

        return self.batched.run(checked, finished, sampling=sampling, eos_ids=eos_ids,
                                on_progress=on_progress)

    def decode_for_prompt(self, prompt_tokens: int):
        """Set the host layers' decode mode (when the mode asked is "auto") and split share that
        the time model finds fastest for this prompt on the plan's KV store; the plan's are for a
        prompt that fills the context. Returns the prediction (None without host layers).

        While the staging slots keep every host layer's rows (packed), no mode is used: the one
        set is the fastest just past the packed length, for generation that goes beyond it."""
        if not self.plan.host.layers:
            return None
        chosen = after = self.predict_prompt(prompt_tokens)
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


def load_runtime(options: RuntimeOptions, parallel: ParallelContext = SINGLE_PROCESS) -> Runtime:
    return Runtime(resolve_model(options.model), options, parallel)
