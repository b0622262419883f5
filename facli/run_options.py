"""The options of a run that generate, perplexity, bench and summarize share: one frozen type,
checked once where it is made, that each command's request holds and the planner and runtime
read (facli.run.placement.plan_run, facli.run.runtime.Runtime)."""

from dataclasses import dataclass

from facli.errors import FacliError
from facli.models.resolve import DTYPES
from facli.planner.search import check_decode_mode
from facli.units import MAX_CTX, check_count

KV_DTYPES = ("auto", "bf16", "fp16", "fp32", "fp8")


def check_kv_dtype(kv_dtype: str) -> None:
    """Raise a FacliError unless `kv_dtype` is a --kv-dtype choice."""
    if kv_dtype not in KV_DTYPES:
        raise FacliError(f"expected --kv-dtype one of {', '.join(KV_DTYPES)}, got {kv_dtype!r}")


@dataclass(frozen=True)
class RunOptions:
    """What a user asks of a run, as the command-line options say it (facli/options.py)."""

    model: str | None = None  # --model; None: $FACLI_MODEL, else the trained default
    device: str | None = None  # cpu or cuda; None: cuda where a GPU is present
    dtype: str = "auto"
    kv_dtype: str = "auto"
    # None: the command's own (prompt + new tokens for generate, each depth's for bench, the
    # model's max_position_embeddings for summarize, the default window for perplexity)
    ctx: int | None = None
    prefill_chunk: int | None = None  # None: the plan's
    devices: int = 1  # tensor-parallel ranks
    decode_mode: str = "auto"  # for host-resident KV: auto, prefetch, cpu or split
    allreduce_tile_tokens: int | None = None  # None: the plan's, from the hardware spec
    allow_ctx_extension: bool = False
    force: bool = False  # run a plan that does not fit
    hardware: str | None = None  # a hardware recipe name; None or "auto" detects this machine
    cuda_graphs: bool = True  # capture decode steps in CUDA graphs (False: eager, for debugging)
    batch: int | None = 1  # rows of the KV cache: prompts decoded together; None: auto

    def __post_init__(self):
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise FacliError(f"expected --dtype one of auto, {', '.join(DTYPES)}, got {self.dtype!r}")
        check_kv_dtype(self.kv_dtype)
        check_decode_mode(self.decode_mode)
        if self.device not in (None, "cpu", "cuda"):
            raise FacliError(f"expected --device cpu or cuda, got {self.device!r}")
        check_count(self.ctx, "--ctx", low=0, high=MAX_CTX, optional=True)
        check_count(self.prefill_chunk, "--prefill-chunk", optional=True)
        check_count(self.allreduce_tile_tokens, "--allreduce-tile-tokens", optional=True)
        check_count(self.devices, "--devices")
        check_count(self.batch, "--batch", optional=True)
