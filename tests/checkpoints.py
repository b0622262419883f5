"""Small random Hugging Face checkpoints written with transformers' own save_pretrained."""

from pathlib import Path

import torch
import transformers

BASE = dict(
    vocab_size=384,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
)

CLASSES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
}


def build_checkpoint(directory: Path, model_type: str = "llama", seed: int = 0, **overrides):
    """Write a random model to `directory` (float32) and return the transformers model, in eval mode."""
    config_class, model_class = CLASSES[model_type]
    values = {**BASE, **overrides}
    if model_type == "mistral":
        values.setdefault("sliding_window", None)
    config = config_class(**values)
    torch.manual_seed(seed)
    model = model_class(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            # Larger than the default init so that logits are far from uniform.
            param.normal_(0.0, 0.08)
    model.save_pretrained(directory, safe_serialization=True)
    return model


def load_llama(directory: Path, dtype: torch.dtype, device, **overrides):
    """facli's CausalLM of a random llama checkpoint written to `directory` (shape: BASE with
    `overrides`)."""
    from facli.models.checkpoint import CheckpointReader
    from facli.models.config import ModelConfig
    from facli.models.llama import CausalLM

    build_checkpoint(directory, "llama", **overrides)
    model = CausalLM(ModelConfig.from_dir(directory), dtype=dtype, device=device)
    model.load(CheckpointReader(directory))
    return model
