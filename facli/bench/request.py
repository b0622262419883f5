"""What a `facli bench` run measures, and what facli's side (facli.bench.measure) and the
transformers baseline (facli.bench.baseline) share: the request, its prompts, the warm-up,
the out-of-memory status and a clean slate between measurements."""

import gc
import sys
from dataclasses import dataclass, field

import torch

from facli.errors import FacliError
from facli.models.resolve import ResolvedModel, resolve_model, synthetic_model
from facli.run.sampling import SamplingParams
from facli.run_options import RunOptions

BASELINES = ("transformers", "none")
PROMPT_SLACK = 8  # context left empty beyond prompt + decode tokens
# Decode positions on both sides of a multiple of 16 (Triton specializes integer arguments).
WARM_UP_NEW_TOKENS = {"cuda": 17, "cpu": 2}
OUT_OF_MEMORY = "out of memory"
DOES_NOT_FIT = "does not fit"  # the plan found no placement; nothing was run
GREEDY = SamplingParams(temperature=0.0)


@dataclass(frozen=True)
class BenchRequest:
    """What to measure. run.model: a checkpoint directory or recipe name; synthetic: a recipe
    name whose shape gets random weights on the device; neither: the default model (--model
    left out). run.ctx: the context to plan for at every depth (None: each depth's own);
    run.batch: prompts decoded together, one per row of the KV cache (None: at each depth as
    many as keep the cache on the GPUs, Runtime.resident_rows); run.kv_dtype is facli's KV
    cache (the baseline keeps its model dtype)."""

    depths: tuple[int, ...]
    run: RunOptions = field(default_factory=RunOptions)
    synthetic: str | None = None
    decode_tokens: int = 64
    baseline: str = "transformers"
    # Rounds of facli then the baseline; each speed figure is the median over the rounds.
    repeats: int = 1

    def __post_init__(self):
        if self.run.model is not None and self.synthetic is not None:
            raise FacliError("expected at most one of --model and --synthetic, got both")
        if self.baseline not in BASELINES:
            raise FacliError(f"expected --baseline one of {', '.join(BASELINES)}, got {self.baseline!r}")
        if self.decode_tokens < 3:
            # The first token comes from prefill, and the rate is timed from the end of the
            # first decode step: one timed step needs three tokens.
            raise FacliError(f"expected --decode-tokens >= 3 (decode speed is timed from the second "
                             f"decode step on), got {self.decode_tokens}")
        if self.repeats < 1:
            raise FacliError(f"expected --repeats >= 1, got {self.repeats}")
        if not self.depths:
            raise FacliError("expected at least one --depth, such as 8k,32k, got none")
        smallest = self.decode_tokens + PROMPT_SLACK + 1
        too_small = [d for d in self.depths if d < smallest]
        if too_small:
            raise FacliError(
                f"expected every --depth >= {smallest} (--decode-tokens {self.decode_tokens} + "
                f"{PROMPT_SLACK} + a prompt), got {too_small[0]}; raise --depth or lower --decode-tokens"
            )
        object.__setattr__(self, "depths", tuple(sorted(set(self.depths))))
        ctx = self.run.ctx
        if ctx is not None and ctx < self.depths[-1]:
            raise FacliError(f"expected --ctx >= every --depth ({self.depths[-1]}), got {ctx}; "
                             f"raise --ctx or leave it out to plan each depth for itself")

    def as_dict(self) -> dict:
        """The request as the report shows it."""
        run = self.run
        return {"depths": list(self.depths), "model": run.model, "synthetic": self.synthetic,
                "decode_tokens": self.decode_tokens, "devices": run.devices, "device": run.device,
                "dtype": run.dtype, "prefill_chunk": run.prefill_chunk, "baseline": self.baseline,
                "kv_dtype": run.kv_dtype, "decode_mode": run.decode_mode,
                "allreduce_tile_tokens": run.allreduce_tile_tokens, "ctx": run.ctx,
                "batch": run.batch, "repeats": self.repeats}


def resolve(request: BenchRequest) -> ResolvedModel:
    """The model the request names: synthetic weights of a recipe's shape, or a checkpoint."""
    if request.synthetic is not None:
        return synthetic_model(request.synthetic)
    return resolve_model(request.run.model)


def prompt_length(depth: int, decode_tokens: int) -> int:
    """Prompt tokens that, with the decoded ones, fill `depth` up to PROMPT_SLACK."""
    return depth - decode_tokens - PROMPT_SLACK


def random_text(num_chars: int, seed: int = 0) -> str:
    """Printable ASCII: one token per character under the byte-level tokenizer."""
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(32, 127, (num_chars,), generator=generator)
    return "".join(map(chr, codes.tolist()))


def prompt_ids(encode, num_tokens: int) -> list[int]:
    """Exactly `num_tokens` ids of random text (more text until the tokenizer yields enough)."""
    chars = num_tokens
    while True:
        ids = encode(random_text(chars))
        if len(ids) >= num_tokens:
            return list(ids[:num_tokens])
        chars *= 2


def release_memory(device: torch.device) -> None:
    """Collect garbage and hand cached blocks back, so the next measurement starts clean."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def progress(message: str, enabled: bool = True) -> None:
    if enabled:
        print(f"facli bench: {message}", file=sys.stderr, flush=True)
