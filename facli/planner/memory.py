"""Bytes per device of one placement: what the runtime allocates, term by term.

The predicted peak is meant to match torch.cuda.max_memory_allocated of a run that executes
the plan (it excludes the CUDA context; GpuSpec.reserved_bytes and the safety margin cover
that when deciding what fits). Calibrate against measurements by editing ACTIVATION_TERMS,
LOGITS_BYTES_PER_VOCAB_ENTRY and the WORKSPACE_* constants; nothing else holds a guess.
"""

import math
from dataclasses import dataclass

from facli.errors import FacliError
from facli.models.config import ModelConfig
from facli.planner.policy import (
    COPY_ENGINE_INBOXES,
    FP8_PREFILL_TILE_ROWS,
    FP8_RING_ROWS,
    STAGING_SLOTS,
)

MIB = 1024**2

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1}
_DTYPE_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16",
                  "float": "fp32", "float8": "fp8", "float8_e4m3fn": "fp8"}


def canonical_dtype(name: str) -> str:
    """'bfloat16' -> 'bf16'; unknown names list the valid ones."""
    key = _DTYPE_ALIASES.get(str(name).lower(), str(name).lower())
    if key not in DTYPE_BYTES:
        raise FacliError(f"expected a dtype, one of {', '.join(DTYPE_BYTES)}, got {name!r}")
    return key


@dataclass(frozen=True)
class ActivationTerm:
    """`count` tensors of [tokens, width] alive at some point of a prefill chunk's layer.

    phase "layer": alive through the whole layer; otherwise the part of the layer ("norm",
    "attention", "mlp") during which it lives. The peak is the layer terms plus the largest
    phase, since one phase's temporaries are freed before the next phase starts.
    """

    name: str
    count: int
    width: str  # "hidden", "q", "kv", "intermediate" or "head_dim"
    sharded: bool  # split over tensor-parallel ranks
    phase: str
    fp32: bool = False  # float32 whatever the model dtype


# --- calibration: the prefill activation peak per token of the chunk (facli/models/llama.py) ---
ACTIVATION_TERMS = (
    ActivationTerm("residual_and_normed", 2, "hidden", sharded=False, phase="layer"),
    ActivationTerm("rope_cos_sin", 2, "head_dim", sharded=False, phase="layer"),
    ActivationTerm("norm_fp32", 2, "hidden", sharded=False, phase="norm", fp32=True),
    ActivationTerm("q", 1, "q", sharded=True, phase="attention"),
    ActivationTerm("k_and_v", 2, "kv", sharded=True, phase="attention"),
    ActivationTerm("rope_temporaries", 2, "q", sharded=True, phase="attention"),
    ActivationTerm("attention_out", 1, "q", sharded=True, phase="attention"),
    ActivationTerm("o_proj_out", 1, "hidden", sharded=False, phase="attention"),
    ActivationTerm("mlp_gate_up_and_product", 3, "intermediate", sharded=True, phase="mlp"),
)
LOGITS_BYTES_PER_VOCAB_ENTRY = 4  # fp32 logits of the last position only, per sequence
WORKSPACE_FIXED_BYTES = 64 * MIB  # cuBLAS workspace, small buffers, allocator rounding
WORKSPACE_DECODE_SPLIT_TOKENS = 256  # split-KV decode: one fp32 partial (D + 2) per split
WORKSPACE_ROPE_TABLE = False  # True if the runtime keeps fp32 cos/sin for all ctx positions
# Tensor parallelism, per rank (facli.parallel): the embedding's all_reduce output
# [chunk, hidden] in the model dtype, and the logits all_gather (the rank's parts and the
# concatenated [B, V], fp32). Tiling-AllReduce reduces tiles of the projection's own output
# buffer, so tiles cost no memory of their own; copy-engine sums need their inboxes
# (policy.COPY_ENGINE_INBOXES, each a whole projection output [chunk, hidden]).
COMM_EMBEDDING_OUTPUTS = 1
COMM_LOGITS_COPIES = 2
# Outside PyTorch's allocator, so in the budget but never in the predicted peak: NCCL's
# communicator buffers (NCCL_BUFFSIZE per channel and peer, both directions) and its kernels'
# context, per rank when ranks > 1; an upper estimate for 8 ranks.
NCCL_RESERVED_BYTES = 512 * MIB
FP8_SCALE_BYTES = 4  # one float32 scale per token and KV head, for K and for V


def _width(config: ModelConfig, width: str) -> int:
    return {
        "hidden": config.hidden_size,
        "q": config.num_attention_heads * config.head_dim,
        "kv": config.num_key_value_heads * config.head_dim,
        "intermediate": config.intermediate_size,
        "head_dim": config.head_dim,
    }[width]


def activation_breakdown(config: ModelConfig, chunk: int, batch: int, dtype_bytes: int,
                         tp: int = 1) -> dict[str, int]:
    """Bytes of each activation term (and the last position's logits) for a prefill chunk of
    `chunk` tokens per sequence on one rank. Not all are alive at once: see activation_bytes."""
    tokens = chunk * batch
    terms = {}
    for term in ACTIVATION_TERMS:
        width = _width(config, term.width)
        if term.sharded:
            width = math.ceil(width / tp)
        terms[term.name] = term.count * tokens * width * (4 if term.fp32 else dtype_bytes)
    terms["logits"] = batch * config.vocab_size * LOGITS_BYTES_PER_VOCAB_ENTRY
    return terms


def activation_bytes(config: ModelConfig, chunk: int, batch: int, dtype_bytes: int,
                     tp: int = 1) -> int:
    """Transient bytes at the peak of one prefill chunk on one rank: the layer terms, the
    largest phase of ACTIVATION_TERMS, and the logits."""
    terms = activation_breakdown(config, chunk, batch, dtype_bytes, tp)
    phases: dict[str, int] = {}
    for term in ACTIVATION_TERMS:
        phases[term.phase] = phases.get(term.phase, 0) + terms[term.name]
    layer = phases.pop("layer", 0)
    return layer + max(phases.values(), default=0) + terms["logits"]


def weight_bytes(config: ModelConfig, dtype_bytes: int, tp: int = 1) -> int:
    """Weights held by one of `tp` ranks: projections and MLP split, norms replicated,
    embeddings and lm_head split over the vocabulary (a tied pair stored once)."""
    h, d = config.hidden_size, config.head_dim
    q = config.num_attention_heads * d
    kv = config.num_key_value_heads * d
    projections = h * q + 2 * h * kv + q * h
    biases = q + 2 * kv if config.attention_bias else 0
    # Llama-style attention_bias also biases o_proj (whole on every rank); Qwen2 has none there.
    o_bias = h if config.attention_bias and config.model_type != "qwen2" else 0
    mlp = 3 * h * config.intermediate_size
    sharded_layer = math.ceil((projections + biases + mlp) / tp)
    per_layer = sharded_layer + 2 * h + o_bias
    vocab_rows = math.ceil(config.vocab_size / tp)
    embeddings = vocab_rows * h * (1 if config.tie_word_embeddings else 2)
    params = config.num_hidden_layers * per_layer + embeddings + h
    return params * dtype_bytes


def kv_layer_bytes(config: ModelConfig, ctx: int, batch: int, dtype_bytes: int,
                   tp: int = 1) -> int:
    """K and V of one layer for `ctx` positions on one rank (KV heads split over ranks).
    dtype_bytes 1 is fp8: one float32 scale per token and head rides along."""
    heads = config.num_key_value_heads // tp
    per_head = config.head_dim * dtype_bytes + (FP8_SCALE_BYTES if dtype_bytes == 1 else 0)
    return 2 * batch * ctx * heads * per_head


def staging_bytes(config: ModelConfig, ctx: int, batch: int, host_layers: int,
                  weight_dtype_bytes: int, kv_dtype_bytes: int, tp: int = 1) -> int:
    """GPU buffers for host-resident layers: staging slots in the model dtype, fp8 ring."""
    if host_layers == 0:
        return 0
    slots = min(STAGING_SLOTS, host_layers)
    staged = slots * kv_layer_bytes(config, ctx, batch, weight_dtype_bytes, tp)
    if kv_dtype_bytes == 1:
        staged += kv_layer_bytes(config, min(FP8_RING_ROWS, ctx), batch, 1, tp)
    return staged


def fp8_tile_bytes(config: ModelConfig, ctx: int, weight_dtype_bytes: int, tp: int = 1) -> int:
    """The dequantized K and V tile that prefill over GPU-resident fp8 rows reads (workspace:
    allocated per prefill step, not held by the store). One sequence's: the runtime prefills
    the rows of a batch one at a time."""
    return kv_layer_bytes(config, min(ctx, FP8_PREFILL_TILE_ROWS), 1, weight_dtype_bytes, tp)


def workspace_bytes(config: ModelConfig, ctx: int, batch: int, tp: int = 1) -> int:
    """Fixed workspace, split-KV decode partials and the RoPE table."""
    splits = math.ceil(ctx / WORKSPACE_DECODE_SPLIT_TOKENS)
    heads = config.num_attention_heads // tp
    partials = batch * heads * splits * (config.head_dim + 2) * 4
    rope = 2 * ctx * config.head_dim * 4 if WORKSPACE_ROPE_TABLE else 0
    return WORKSPACE_FIXED_BYTES + partials + rope


def comm_bytes(config: ModelConfig, chunk: int, batch: int, dtype_bytes: int, tp: int,
               copy_inboxes: bool = False) -> int:
    """Tensor-parallel buffers of one rank beyond the layer activations (see COMM_*), and the
    copy-engine inboxes when prefill tiles are exchanged that way."""
    if tp == 1:
        return 0
    embedding = COMM_EMBEDDING_OUTPUTS * chunk * batch * config.hidden_size * dtype_bytes
    logits = COMM_LOGITS_COPIES * batch * config.vocab_size * 4
    inboxes = COPY_ENGINE_INBOXES * chunk * batch * config.hidden_size * dtype_bytes if copy_inboxes else 0
    return embedding + logits + inboxes


@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes on one device at the run's peak (prefill of a chunk with the cache nearly full)."""

    weights: int
    kv: int
    kv_staging: int
    activations: int
    comm: int
    workspace: int

    @property
    def total(self) -> int:
        return (self.weights + self.kv + self.kv_staging + self.activations + self.comm
                + self.workspace)


def device_memory(config: ModelConfig, *, ctx: int, batch: int, tp: int, gpu_layers: int,
                  host_layers: int, chunk: int, weight_dtype_bytes: int,
                  kv_dtype_bytes: int, copy_inboxes: bool = False,
                  fp8_tiles: bool = True) -> MemoryBreakdown:
    """Peak bytes on one rank. Host layers need GPU staging (see staging_bytes). The runtime
    prefills one sequence at a time (a batch's sequences are rows that then decode together,
    facli.run.batching), so the activations are the larger of one sequence's prefill chunk and a
    decode step of `batch` tokens; the chunk's nearly always. NCCL's AllReduce tiles cost no
    memory (views of the projection output); copy-engine tiles need their inboxes
    (copy_inboxes, comm_bytes). fp8_tiles: prefill over GPU-resident fp8 rows dequantizes them in
    tiles (fp8_tile_bytes), as everywhere but where the prefill kernel reads e4m3 itself."""
    layer_kv = kv_layer_bytes(config, ctx, batch, kv_dtype_bytes, tp)
    workspace = workspace_bytes(config, ctx, batch, tp)
    if kv_dtype_bytes == 1 and gpu_layers and fp8_tiles:
        workspace += fp8_tile_bytes(config, ctx, weight_dtype_bytes, tp)
    return MemoryBreakdown(
        weights=weight_bytes(config, weight_dtype_bytes, tp),
        kv=gpu_layers * layer_kv,
        kv_staging=staging_bytes(config, ctx, batch, host_layers, weight_dtype_bytes,
                                 kv_dtype_bytes, tp),
        activations=max(activation_bytes(config, max(chunk, 1), 1, weight_dtype_bytes, tp),
                        activation_bytes(config, 1, batch, weight_dtype_bytes, tp)),
        comm=max(comm_bytes(config, chunk, 1, weight_dtype_bytes, tp, copy_inboxes),
                 comm_bytes(config, 1, batch, weight_dtype_bytes, tp, copy_inboxes)),
        workspace=workspace,
    )


def reserved_outside_allocator(tp: int) -> int:
    """Per-rank bytes the runtime uses outside PyTorch's allocator beyond the CUDA context."""
    return NCCL_RESERVED_BYTES if tp > 1 else 0
