"""facli's Llama-family decoder (llama, mistral, qwen2), tensor-parallel by construction.

The model never sees where its KV cache lives: each attention layer hands its new keys and
values to a KVStore and gets the attention output back.
"""

import torch
import torch.nn.functional as F
from torch import nn

from facli.kernels import elementwise
from facli.models.checkpoint import CheckpointReader
from facli.models.config import ModelConfig
from facli.models.rope import RotaryEmbedding
from facli.offload.store import KVStore
from facli.parallel import overlap, waves
from facli.parallel.context import ParallelContext
from facli.parallel.degrees import check_tensor_parallel
from facli.parallel.layers import (
    MergedColumnParallelLinear,
    ParallelLMHead,
    RowParallelLinear,
    VocabParallelEmbedding,
    packs_on_cpu,
)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, dtype, device):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(size, dtype=dtype, device=device), requires_grad=False)

    def load(self, reader: CheckpointReader, name: str) -> None:
        self.weight.data = reader.read(name, tuple(self.weight.shape), self.weight.dtype, self.weight.device)

    def forward(self, x, residual=None):
        """weight * normalize(x); with residual, (weight * normalize(x + residual), x + residual)."""
        return elementwise.rms_norm(x, self.weight, self.eps, residual)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, parallel: ParallelContext, dtype, device):
        super().__init__()
        d, h = config.head_dim, config.hidden_size
        self.head_dim = d
        self.local_q_heads = config.num_attention_heads // parallel.world_size
        self.local_kv_heads = config.num_key_value_heads // parallel.world_size
        linear = dict(parallel=parallel, dtype=dtype, device=device)
        qkv_bias = config.attention_bias
        o_bias = config.attention_bias and config.model_type != "qwen2"
        kv_width = config.num_key_value_heads * d
        self.qkv_proj = MergedColumnParallelLinear(
            h, (config.num_attention_heads * d, kv_width, kv_width), bias=qkv_bias, **linear)
        self.o_proj = RowParallelLinear(config.num_attention_heads * d, h, bias=o_bias, **linear)

    def load(self, reader: CheckpointReader, prefix: str) -> None:
        self.qkv_proj.load(reader, tuple(f"{prefix}.{name}" for name in ("q_proj", "k_proj", "v_proj")))
        self.o_proj.load(reader, f"{prefix}.o_proj")

    def projections(self, x):
        """This rank's q [B, T, local q heads, D] and k, v [B, T, local KV heads, D], unrotated."""
        batch, length, _ = x.shape
        q, k, v = self.qkv_proj(x)
        return (q.view(batch, length, self.local_q_heads, self.head_dim),
                k.view(batch, length, self.local_kv_heads, self.head_dim),
                v.view(batch, length, self.local_kv_heads, self.head_dim))

    def project(self, x, cos, sin):
        """projections(x) with q and k rotated."""
        q, k, v = self.projections(x)
        return elementwise.apply_rotary(q, cos, sin), elementwise.apply_rotary(k, cos, sin), v

    def attend(self, x, cos, sin, kv: KVStore, layer: int, start):
        """This rank's attention heads before o_proj: [B, T, local heads * D]."""
        if isinstance(start, torch.Tensor):
            # A decode step at device positions: the store rotates q and k as it writes k and v,
            # one kernel on a GPU instead of four.
            q, k, v = self.projections(x)
            out = kv.attend(layer, q, k, v, start, rotary=(cos, sin))
        else:
            q, k, v = self.project(x, cos, sin)
            out = kv.attend(layer, q, k, v, start)
        return out.reshape(*x.shape[:2], -1)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, parallel: ParallelContext, dtype, device):
        super().__init__()
        h, inter = config.hidden_size, config.intermediate_size
        linear = dict(bias=False, parallel=parallel, dtype=dtype, device=device)
        self.gate_up_proj = MergedColumnParallelLinear(h, (inter, inter), **linear)
        self.down_proj = RowParallelLinear(inter, h, **linear)

    def load(self, reader: CheckpointReader, prefix: str) -> None:
        self.gate_up_proj.load(reader, (f"{prefix}.gate_proj", f"{prefix}.up_proj"))
        self.down_proj.load(reader, f"{prefix}.down_proj")

    def forward(self, x, residual=None):
        """down(SiLU(gate(x)) * up(x)), plus residual: on a GPU at one token the down projection
        adds it as it writes."""
        return self.down_proj(self.inner(x), residual)

    def inner(self, x):
        gate, up = self.gate_up_proj(x)
        if gate.is_cuda:
            return elementwise.silu_mul(gate, up)
        # On the CPU the same ops in place in the projection's output: past the allocator's
        # mmap threshold (32 MiB) each fresh [T, I] buffer would be mapped and page-faulted anew.
        return F.silu(gate, inplace=True).mul_(up)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, parallel: ParallelContext, dtype, device):
        super().__init__()
        self.parallel = parallel
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device)
        self.self_attn = Attention(config, parallel, dtype, device)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device)
        self.mlp = MLP(config, parallel, dtype, device)

    def load(self, reader: CheckpointReader, prefix: str) -> None:
        self.input_layernorm.load(reader, f"{prefix}.input_layernorm.weight")
        self.self_attn.load(reader, f"{prefix}.self_attn")
        self.post_attention_layernorm.load(reader, f"{prefix}.post_attention_layernorm.weight")
        self.mlp.load(reader, f"{prefix}.mlp")

    def forward(self, x, cos, sin, kv, layer, start, last_position_only: bool = False):
        """x [B, T, H] -> [B, T, H]; with last_position_only, [B, 1, H] of the last position
        (every position's K/V is stored all the same)."""
        attn = self.self_attn.attend(self.input_layernorm(x), cos, sin, kv, layer, start)
        if last_position_only:
            x, attn = x[:, -1:], attn[:, -1:]
        if overlap.pipelines(self.parallel, x):
            return overlap.layer_tail(x, attn, self.self_attn.o_proj, self.post_attention_layernorm,
                                      self.mlp, self.parallel)
        return self.tail(x, attn)

    def project(self, x, cos, sin):
        """The layer up to its KV cache: q, k, v of the normalized input x [B, T, H]."""
        return self.self_attn.project(self.input_layernorm(x), cos, sin)

    def tail(self, x, attn):
        """The layer after its attention: h = x + o_proj(attn), then h + MLP(norm(h)), for the
        layer input x [B, T, H]."""
        normed, x = self.post_attention_layernorm(x, self.self_attn.o_proj(attn))
        return self.mlp(normed, residual=x)


class CausalLM(nn.Module):
    """Embeddings, decoder layers, final norm and LM head; weights come from `load`."""

    def __init__(self, config: ModelConfig, *, dtype: torch.dtype, device: torch.device,
                 parallel: ParallelContext = ParallelContext()):
        super().__init__()
        check_tensor_parallel(config, parallel.world_size)
        self.config, self.parallel = config, parallel
        self.dtype, self.device = dtype, torch.device(device)
        shared = dict(parallel=parallel, dtype=dtype, device=device)
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, **shared)
        self.layers = nn.ModuleList(
            DecoderLayer(config, parallel, dtype, device) for _ in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device)
        tied = self.embed_tokens if config.tie_word_embeddings else None
        self.lm_head = ParallelLMHead(tied, config.vocab_size, config.hidden_size, **shared)
        self.rotary = RotaryEmbedding(config, self.device)

    def load(self, reader: CheckpointReader) -> None:
        self.embed_tokens.load(reader, "model.embed_tokens.weight")
        for index, layer in enumerate(self.layers):
            layer.load(reader, f"model.layers.{index}")
        self.norm.load(reader, "model.norm.weight")
        self.lm_head.load(reader, "lm_head.weight")

    def pack_on_cpu(self) -> bool:
        """With weights in place, on one CPU rank in float32: every layer's matrices in oneDNN's
        packed layout. The LM head stays dense: it shares the embedding table and multiplies one
        row. Returns whether it packed."""
        if self.device.type != "cpu" or self.parallel.is_distributed or not packs_on_cpu(self.dtype):
            return False
        for layer in self.layers:
            for linear in (layer.self_attn.qkv_proj, layer.self_attn.o_proj,
                           layer.mlp.gate_up_proj, layer.mlp.down_proj):
                linear.pack_on_cpu()
        return True

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, start: int, kv: KVStore, *, all_logits: bool = False):
        """ids [B, T] at positions start..start+T -> float32 logits [B, V] of the last position
        ([B, T, V] with all_logits)."""
        x = self.embed_tokens(ids)
        cos, sin = self.rotary.cos_sin(start, ids.shape[1], self.dtype)
        if waves.applies(self.parallel, x, kv):
            x = waves.run_layers(self.layers, x, cos, sin, kv, start, self.parallel,
                                 waves.exchange_for(self.parallel, x))
        else:
            # Only the last position reaches the logits: the last layer's o_proj and MLP skip
            # the others.
            last = len(self.layers) - 1
            for index, layer in enumerate(self.layers):
                x = layer(x, cos, sin, kv, index, start,
                          last_position_only=index == last and not all_logits)
        if all_logits:
            return self.head(x)
        return self.head(x[:, -1:])[:, -1]

    @torch.inference_mode()
    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head: hidden states [B, T, H] -> float32 logits [B, T, V]."""
        return self.lm_head(self.norm(x))
