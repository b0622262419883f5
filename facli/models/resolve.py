"""From command-line words to concrete things: a model's files, a device, a dtype."""

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from facli.errors import FacliError
from facli.kernels.common import triton_module
from facli.models.cache import cache_dir
from facli.models.config import ModelConfig
from facli.models.default_model import RANDOM_DEMO, default_gguf, default_model_name
from facli.models.demo import byte_level_tokenizer, ensure_demo_checkpoint
from facli.models.gguf_checkpoint import converted_checkpoint, gguf_file_in
from facli.models.recipe_loader import load_model_recipe, resolve_weights_dir
from facli.models.tokenizer import load_tokenizer
from facli.parallel.context import SINGLE_PROCESS, ParallelContext
from facli.units import MAX_CTX, format_ctx

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


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


def resolve_model(model: str | None) -> ResolvedModel:
    """`--model`: a checkpoint directory, a .gguf file (or a folder holding one), a recipe name,
    or `random-demo`; None means $FACLI_MODEL, else the trained default
    (facli.models.default_model)."""
    model = model or default_model_name()
    if model is None:
        return _converted(default_gguf())
    if model == RANDOM_DEMO:
        path = ensure_demo_checkpoint()
        return ResolvedModel(RANDOM_DEMO, path, ModelConfig.from_dir(path))
    candidate = Path(model).expanduser()
    gguf = gguf_file_in(candidate) if candidate.exists() else None
    if gguf is not None:
        return _converted(gguf)
    if candidate.is_dir():
        return ResolvedModel(candidate.name, candidate, ModelConfig.from_dir(candidate))
    if candidate.exists():
        raise FacliError(f"expected --model to be a checkpoint folder, a .gguf file or a recipe "
                         f"name, got {model}, which is a file of another kind")
    if "/" in model or model.startswith("."):
        raise FacliError(f"expected --model to be a checkpoint folder, a .gguf file or a recipe "
                         f"name, {model} does not exist")
    recipe = load_model_recipe(model)
    path = resolve_weights_dir(recipe)
    return ResolvedModel(model, path, ModelConfig.from_dir(path))


def _converted(gguf: Path) -> ResolvedModel:
    """A GGUF file's converted folder (converted now on first use), named after the file."""
    path = converted_checkpoint(gguf, cache_dir())
    return ResolvedModel(gguf.stem, path, ModelConfig.from_dir(path))


def synthetic_model(recipe_name: str) -> ResolvedModel:
    """A recipe's architecture with random weights: nothing is read from disk."""
    recipe = load_model_recipe(recipe_name)
    return ResolvedModel(f"synthetic:{recipe_name}", None, recipe.config)


def tokenizer_for(resolved: ResolvedModel):
    if resolved.synthetic:
        return byte_level_tokenizer()
    return load_tokenizer(resolved.path)


def resolve_device(device: str | None, parallel: ParallelContext = SINGLE_PROCESS) -> torch.device:
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise FacliError("expected a CUDA GPU for --device cuda, found none; use --device cpu")
        triton_module("elementwise_triton")  # GPU runs need Triton: say so before any loading
        return torch.device("cuda", parallel.local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def generation_ctx(config: ModelConfig, prompt_tokens: int, max_new_tokens: int,
                   allow_extension: bool) -> int:
    """The context of a run whose --ctx is left out: the prompt and --max-new-tokens, refused
    where they overrun what the model (or facli) can serve, naming --max-new-tokens."""
    ctx = prompt_tokens + max_new_tokens
    limits = [(MAX_CTX, f"facli's largest context, {format_ctx(MAX_CTX)}")]
    if config.sliding_window is not None:
        limits.append((config.sliding_window, "the model's sliding_window"))
    if not allow_extension:
        limits.append((config.max_position_embeddings,
                       "the model's context, max_position_embeddings"))
    limit, what = min(limits)
    if ctx <= limit:
        return ctx
    room = limit - prompt_tokens
    fix = f"lower --max-new-tokens to at most {room}" if room > 0 else "shorten the prompt"
    if "max_position_embeddings" in what:
        fix += ", or pass --allow-ctx-extension to run past the trained length"
    raise FacliError(
        f"expected the prompt ({prompt_tokens} tokens) and --max-new-tokens ({max_new_tokens}) "
        f"to fit {what} ({limit} tokens), got {ctx}; {fix}"
    )


def check_prompt_fits(prompt_tokens: int, ctx: int) -> None:
    if prompt_tokens >= ctx:
        raise FacliError(
            f"expected a prompt shorter than --ctx ({ctx} tokens), got {prompt_tokens} "
            "tokens; raise --ctx or shorten the prompt"
        )


def check_context(config: ModelConfig, ctx: int, allow_extension: bool, *, warn: bool = True) -> None:
    """Refuse a ctx the model cannot serve; warn (once, where the command checks) past its
    trained length when that is allowed."""
    config.check_sliding_window(ctx)
    limit = config.max_position_embeddings
    if ctx <= limit:
        return
    if not allow_extension:
        raise FacliError(
            f"expected --ctx at most the model's max_position_embeddings ({limit}), got {ctx}; "
            "pass --allow-ctx-extension to run past the trained length anyway"
        )
    if warn:
        print(f"facli: warning: --ctx {ctx} is beyond max_position_embeddings {limit}; "
              "quality past the trained length is not guaranteed", file=sys.stderr)
