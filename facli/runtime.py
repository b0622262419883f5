"""From a --model argument to a ready model: resolve, check, plan, load, and generate.

The runtime executes a plan: which device, dtype, prefill chunk and KV placement.
"""

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from facli.checkpoint import CheckpointReader
from facli.config import ModelConfig
from facli.engine import Engine
from facli.errors import FacliError
from facli.kv_cache import DeviceKVCache
from facli.model import CausalLM
from facli.parallel.context import SINGLE_PROCESS, ParallelContext
from facli.sampling import Sampler, SamplingParams
from facli.tokenizer import TextStream, load_tokenizer

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
CHECKPOINT_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class ResolvedModel:
    """Where a model's files are and what architecture they hold; no weights loaded.

    path None means synthetic: random weights of the architecture, made on the device (for
    benchmarks that need no checkpoint), with the demo's byte-level tokenizer.
    """

    name: str
    path: Path | None
    config: ModelConfig

    @property
    def synthetic(self) -> bool:
        return self.path is None


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

    def __post_init__(self):
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise FacliError(f"expected --dtype one of auto, {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.device not in (None, "cpu", "cuda"):
            raise FacliError(f"expected --device cpu or cuda, got {self.device!r}")
        if self.prefill_chunk is not None and self.prefill_chunk <= 0:
            raise FacliError(f"expected --prefill-chunk > 0, got {self.prefill_chunk}")


@dataclass
class GenerationResult:
    token_ids: list[int]
    text: str
    prompt_tokens: int
    ttft_s: float
    decode_tokens_per_s: float
    peak_gpu_bytes: int | None
    finish_reason: str  # "eos" | "length"


def resolve_model(model: str | None) -> ResolvedModel:
    """A directory with config.json, a recipe name, or None for the embedded demo model."""
    if model is None:
        from facli.demo import DEMO_NAME, ensure_demo_checkpoint

        path = ensure_demo_checkpoint()
        return ResolvedModel(DEMO_NAME, path, ModelConfig.from_dir(path))
    candidate = Path(model).expanduser()
    if candidate.is_dir():
        return ResolvedModel(candidate.name, candidate, ModelConfig.from_dir(candidate))
    if "/" in model or model.startswith("."):
        raise FacliError(f"expected --model to be a checkpoint directory or a recipe name, {model} does not exist")
    from facli.recipes import load_model_recipe, resolve_weights_dir

    recipe = load_model_recipe(model)
    path = resolve_weights_dir(recipe)
    return ResolvedModel(model, path, ModelConfig.from_dir(path))


def synthetic_model(recipe_name: str) -> ResolvedModel:
    """A recipe's architecture with random weights: nothing is read from disk."""
    from facli.recipes import load_model_recipe

    recipe = load_model_recipe(recipe_name)
    return ResolvedModel(f"synthetic:{recipe_name}", None, recipe.config)


def resolve_device(device: str | None, ctx: ParallelContext = SINGLE_PROCESS) -> torch.device:
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise FacliError("expected a CUDA GPU for --device cuda, found none; use --device cpu")
        return torch.device("cuda", ctx.local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def resolve_dtype(name: str, config: ModelConfig, device: torch.device) -> torch.dtype:
    """auto: the checkpoint's half precision on GPUs (bf16 for float32 checkpoints), float32 on CPUs."""
    if name != "auto":
        return DTYPES[name]
    if device.type == "cpu":
        return torch.float32
    stored = CHECKPOINT_DTYPES.get(config.torch_dtype, torch.float32)
    return stored if stored != torch.float32 else torch.bfloat16


def check_context(config: ModelConfig, ctx: int, allow_extension: bool) -> None:
    config.check_sliding_window(ctx)
    limit = config.max_position_embeddings
    if ctx <= limit:
        return
    if not allow_extension:
        raise FacliError(
            f"expected --ctx at most the model's max_position_embeddings ({limit}), got {ctx}; "
            "pass --allow-ctx-extension to run past the trained length anyway"
        )
    print(f"facli: warning: --ctx {ctx} is beyond max_position_embeddings {limit}; "
          "quality past the trained length is not guaranteed", file=sys.stderr)


class Runtime:
    """A loaded model, its tokenizer, its KV cache and the engine that runs them."""

    def __init__(self, resolved: ResolvedModel, options: RuntimeOptions,
                 parallel: ParallelContext = SINGLE_PROCESS, tokenizer=None):
        check_context(resolved.config, options.ctx, options.allow_ctx_extension)
        self.resolved, self.options, self.parallel = resolved, options, parallel
        self.config = resolved.config
        self.ctx = options.ctx
        self.device = resolve_device(options.device, parallel)
        self.dtype = resolve_dtype(options.dtype, self.config, self.device)
        self.tokenizer = tokenizer or _tokenizer_for(resolved)
        self.prefill_chunk = options.prefill_chunk or default_prefill_chunk(self.device, self.ctx)
        self.plan = None
        started = time.perf_counter()
        self.model = CausalLM(self.config, dtype=self.dtype, device=self.device, ctx=parallel)
        if resolved.synthetic:
            randomize_weights(self.model, seed=parallel.rank)
        else:
            self.model.load(CheckpointReader(resolved.path))
        self.load_s = time.perf_counter() - started
        self.kv = self._build_kv_store()
        self.engine = Engine(self.model, self.kv, prefill_chunk=self.prefill_chunk)

    def _build_kv_store(self):
        config, world = self.config, self.parallel.world_size
        return DeviceKVCache(config.num_hidden_layers, 1, self.ctx, config.num_key_value_heads // world,
                             config.head_dim, self.dtype, self.device)

    def set_context(self, ctx: int) -> None:
        """Re-plan for another context length and reallocate the KV cache; weights stay."""
        check_context(self.config, ctx, self.options.allow_ctx_extension)
        self.ctx = ctx
        self.kv = None
        self.engine = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.kv = self._build_kv_store()
        self.engine = Engine(self.model, self.kv, prefill_chunk=self.prefill_chunk)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text).input_ids

    def reconfigure(self, *, decode_mode: str | None = None, prefill_chunk: int | None = None) -> None:
        if prefill_chunk is not None:
            self.prefill_chunk = self.engine.prefill_chunk = prefill_chunk

    def generate(self, prompt_ids: list[int], *, max_new_tokens: int, sampling: SamplingParams,
                 prefill_chunk: int | None = None, on_text=None, on_progress=None,
                 ignore_eos: bool = False) -> GenerationResult:
        """ignore_eos: decode all max_new_tokens even past an EOS token (benchmarks)."""
        if not prompt_ids:
            raise FacliError("expected a non-empty prompt, got 0 tokens; give --prompt or --prompt-file")
        if len(prompt_ids) >= self.ctx:
            raise FacliError(
                f"expected a prompt shorter than --ctx ({self.ctx} tokens), got {len(prompt_ids)} "
                "tokens; raise --ctx or shorten the prompt"
            )
        if prefill_chunk is not None:
            self.reconfigure(prefill_chunk=prefill_chunk)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        stream = TextStream(self.tokenizer)

        def on_token(token_id: int) -> None:
            piece = stream.push(token_id)
            if piece and on_text is not None:
                on_text(piece)

        run = self.engine.generate(
            prompt_ids, max_new_tokens=max_new_tokens, sampler=Sampler(sampling, self.device),
            eos_ids=() if ignore_eos else self.eos_ids(), on_token=on_token, on_progress=on_progress,
        )
        peak = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None
        return GenerationResult(
            token_ids=run.token_ids, text=stream.text(), prompt_tokens=len(prompt_ids),
            ttft_s=run.timings.ttft_s, decode_tokens_per_s=run.timings.decode_tokens_per_s,
            peak_gpu_bytes=peak, finish_reason=run.finish_reason,
        )

    def eos_ids(self) -> tuple[int, ...]:
        ids = set(self.config.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return tuple(sorted(ids))


def _tokenizer_for(resolved: ResolvedModel):
    if resolved.synthetic:
        from facli.demo import _byte_level_tokenizer

        return _byte_level_tokenizer()
    return load_tokenizer(resolved.path)


@torch.no_grad()
def randomize_weights(model: CausalLM, seed: int) -> None:
    """Normal(0, 0.02) matrices and unit norms, generated on the model's device."""
    generator = torch.Generator(device=model.device).manual_seed(seed)
    for name, param in model.named_parameters():
        if param.dim() == 1:
            param.fill_(1.0 if name.endswith("norm.weight") else 0.0)
        else:
            param.normal_(0.0, 0.02, generator=generator)


def default_prefill_chunk(device: torch.device, ctx: int) -> int:
    """Activations scale with the chunk; a few thousand tokens keep GEMMs efficient on GPUs."""
    return min(ctx, 4096 if device.type == "cuda" else 512)


def load_runtime(options: RuntimeOptions, parallel: ParallelContext = SINGLE_PROCESS) -> Runtime:
    return Runtime(resolve_model(options.model), options, parallel)
