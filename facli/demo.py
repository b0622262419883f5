"""The embedded default model: a small Llama with random weights and a byte-level tokenizer.

It exists to exercise the whole pipeline on any machine, offline; its text is gibberish. facli
writes it deterministically (seeded) into the user cache on first use.
"""

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from facli.config import ModelConfig

DEMO_NAME = "demo-llama-v2"
DEMO_SEED = 20261121
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")

DEMO_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 384,  # 3 special tokens + 256 bytes, padded to a multiple of 128
    "hidden_size": 512,
    "intermediate_size": 1408,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "max_position_embeddings": 262144,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "bfloat16",
}


def cache_dir() -> Path:
    """$FACLI_CACHE, else $XDG_CACHE_HOME/facli, else ~/.cache/facli."""
    if os.environ.get("FACLI_CACHE"):
        return Path(os.environ["FACLI_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "facli"


def demo_config() -> ModelConfig:
    return ModelConfig.from_dict(DEMO_CONFIG)


def ensure_demo_checkpoint() -> Path:
    """The demo checkpoint's directory, written on first use (atomically: a temp dir, then rename)."""
    target = cache_dir() / DEMO_NAME
    if (target / "model.safetensors").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{DEMO_NAME}-", dir=target.parent))
    try:
        _write_checkpoint(staging)
        try:
            staging.rename(target)
        except OSError:
            if not (target / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _write_checkpoint(directory: Path) -> None:
    (directory / "config.json").write_text(json.dumps(DEMO_CONFIG, indent=2))
    tokenizer = byte_level_tokenizer()
    printable = [tokenizer.convert_tokens_to_ids(token)
                 for token in tokenizer.tokenize("".join(map(chr, range(32, 127))))]
    save_file(_random_weights(demo_config(), printable), str(directory / "model.safetensors"),
              metadata={"format": "pt"})
    tokenizer.save_pretrained(str(directory))


def _random_weights(config: ModelConfig, printable: list[int]) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(DEMO_SEED)
    h, inter, d = config.hidden_size, config.intermediate_size, config.head_dim
    q, kv = config.num_attention_heads * d, config.num_key_value_heads * d

    def normal(*shape):
        return (torch.randn(shape, generator=generator) * 0.05).to(torch.bfloat16)

    weights = {"model.embed_tokens.weight": normal(config.vocab_size, h),
               "model.norm.weight": torch.ones(h, dtype=torch.bfloat16),
               "lm_head.weight": _printable_head(normal(config.vocab_size, h), printable)}
    shapes = {"self_attn.q_proj": (q, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
              "self_attn.o_proj": (h, q), "mlp.gate_proj": (inter, h), "mlp.up_proj": (inter, h),
              "mlp.down_proj": (h, inter)}
    for layer in range(config.num_hidden_layers):
        prefix = f"model.layers.{layer}"
        for name, shape in shapes.items():
            weights[f"{prefix}.{name}.weight"] = normal(*shape)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            weights[f"{prefix}.{norm}.weight"] = torch.ones(h, dtype=torch.bfloat16)
    return weights


def _printable_head(weight: torch.Tensor, printable: list[int]) -> torch.Tensor:
    """Zero the rows of special, non-printable and padding tokens and sharpen the printable
    ASCII ones, so that the demo's (meaningless) output is at least readable text."""
    head = torch.zeros_like(weight)
    head[printable] = weight[printable] * 4
    return head


def byte_level_tokenizer():
    """One token per byte (no merges), built offline with the `tokenizers` library."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    vocab.update({char: len(SPECIAL_TOKENS) + index for index, char in enumerate(alphabet)})
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        model_max_length=DEMO_CONFIG["max_position_embeddings"],
    )
