"""What a `facli bench` run measures, and what facli's side (facli.bench.measure) and the
transformers baseline (facli.bench.baseline) share: the request, its prompts, the warm-up,
the out-of-memory status and a clean slate between measurements."""

import gc
import sys
from dataclasses import dataclass

import torch

from facli.errors import FacliError
from facli.planner.search import check_decode_mode
from facli.resolve import ResolvedModel, resolve_model, synthetic_model
from facli.sampling import SamplingParams

BASELINES = ("transformers", "none")
PROMPT_SLACK = 8  # context left empty beyond prompt + decode tokens
# Decode positions on both sides of a multiple of 16 (Triton specializes integer arguments).
WARM_UP_NEW_TOKENS = {"cuda": 17, "cpu": 2}
OUT_OF_MEMORY = "out of memory"
DOES_NOT_FIT = "does not fit"  # the plan found no placement; nothing was run
GREEDY = SamplingParams(temperature=0.0)


@dataclass(frozen=True)
class BenchRequest:
    """What to measure. model: a checkpoint directory or recipe name; synthetic: a recipe name
    whose shape gets random weights on the device; neither: the default model (--model left out)."""

    depths: tuple[int, ...]
    model: str | None = None
    synthetic: str | None = None
    decode_tokens: int = 64
    devices: int = 1
    device: str | None = None
    dtype: str = "auto"
    prefill_chunk: int | None = None
    baseline: str = "transformers"
    kv_dtype: str = "auto"  # facli's KV cache; the baseline keeps its model dtype
    decode_mode: str = "auto"  # for host-resident KV: auto, prefetch, cpu or split
    allreduce_tile_tokens: int | None = None  # None: the plan's
    ctx: int | None = None  # context to plan for at every depth; None: each depth's own
    # Prompts decoded together, one per row of the KV cache; None: at each depth as many as
    # keep the cache on the GPUs (Runtime.resident_rows).
    batch: int | None = 1
    # Rounds of facli then the baseline; each speed figure is the median over the rounds.
    repeats: int = 1

    def __post_init__(self):
        if self.model is not None and self.synthetic is not None:
            raise FacliError("expected at most one of --model and --synthetic, got both")
        check_decode_mode(self.decode_mode)
        if self.baseline not in BASELINES:
            raise FacliError(f"expected --baseline one of {', '.join(BASELINES)}, got {self.baseline!r}")
        if self.decode_tokens < 3:
            # The first token comes from prefill, and the rate is timed from the end of the
            # first decode step: one timed step needs three tokens.
            raise FacliError(f"expected --decode-tokens >= 3 (decode speed is timed from the second "
                             f"decode step on), got {self.decode_tokens}")
        if self.batch is not None and self.batch < 1:
            raise FacliError(f"expected --batch >= 1 or auto, got {self.batch}")
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
        if self.ctx is not None and self.ctx < self.depths[-1]:
            raise FacliError(f"expected --ctx >= every --depth ({self.depths[-1]}), got {self.ctx}; "
                             f"raise --ctx or leave it out to plan each depth for itself")


def resolve(request: BenchRequest) -> ResolvedModel:
    """The model the request names: synthetic weights of a recipe's shape, or a checkpoint."""
    if request.synthetic is not None:
        return synthetic_model(request.synthetic)
    return resolve_model(request.model)


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
