"""Shared pieces of the benchmark scripts: environment header and a Llama-7B-shaped checkpoint."""

import sys
from pathlib import Path

import torch

from facli.bench.environment import git_commit
from facli.bench.request import random_text  # noqa: F401  (the scripts' prompts)

LLAMA_7B = dict(
    model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
    max_position_embeddings=262144, rms_norm_eps=1e-5, rope_theta=10000.0,
    bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
)


def environment() -> dict:
    import transformers
    import triton

    commit = git_commit()["commit"]
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    return {"gpu": gpu, "cuda": torch.version.cuda, "torch": torch.__version__,
            "triton": triton.__version__, "transformers": transformers.__version__,
            "python": sys.version.split()[0], "commit": commit}


def print_environment(file=sys.stdout) -> dict:
    env = environment()
    print(" | ".join(f"{k} {v}" for k, v in env.items()), file=file, flush=True)
    return env


def write_random_checkpoint(directory: Path, config: dict = LLAMA_7B, seed: int = 0,
                            decodable: bool = False) -> Path:
    """A random bf16 checkpoint of `config`'s shape in HF format, with facli's byte tokenizer.

    Its byte tokenizer has a few hundred ids, so a random model's tokens mostly decode to
    nothing. decodable: LM-head rows past the tokenizer's ids are zero, so greedy tokens (whose
    logits are the largest of hundreds of random ones, almost surely above 0) are text."""
    import transformers

    from facli.models.demo import byte_level_tokenizer

    directory = Path(directory)
    if (directory / "config.json").is_file():
        return directory
    hf_config = transformers.LlamaConfig(**{k: v for k, v in config.items() if k != "model_type"})
    torch.manual_seed(seed)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = transformers.LlamaForCausalLM(hf_config).to(torch.bfloat16)
    tokenizer = byte_level_tokenizer()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.02)
        if decodable:
            model.lm_head.weight[len(tokenizer):] = 0
    model.save_pretrained(directory, safe_serialization=True, max_shard_size="5GB")
    tokenizer.save_pretrained(str(directory))
    del model
    torch.cuda.empty_cache()
    return directory
