"""Shared pieces of the benchmark scripts: environment header and a Llama-7B-shaped checkpoint."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

LLAMA_7B = dict(
    model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
    max_position_embeddings=262144, rms_norm_eps=1e-5, rope_theta=10000.0,
    bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
)


def environment() -> dict:
    import transformers
    import triton

    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                         cwd=Path(__file__).parent)
    # A copy without .git (a lent GPU machine) names its commit in FACLI_COMMIT.
    commit = git.stdout.strip() or os.environ.get("FACLI_COMMIT", "unknown")
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    return {"gpu": gpu, "cuda": torch.version.cuda, "torch": torch.__version__,
            "triton": triton.__version__, "transformers": transformers.__version__,
            "python": sys.version.split()[0], "commit": commit}


def print_environment(file=sys.stdout) -> dict:
    env = environment()
    print(" | ".join(f"{k} {v}" for k, v in env.items()), file=file, flush=True)
    return env


def write_random_checkpoint(directory: Path, config: dict = LLAMA_7B, seed: int = 0) -> Path:
    """A random bf16 checkpoint of `config`'s shape in HF format, with facli's byte tokenizer."""
    import transformers

    from facli.demo import _byte_level_tokenizer

    directory = Path(directory)
    if (directory / "config.json").is_file():
        return directory
    hf_config = transformers.LlamaConfig(**{k: v for k, v in config.items() if k != "model_type"})
    torch.manual_seed(seed)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = transformers.LlamaForCausalLM(hf_config).to(torch.bfloat16)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.02)
    model.save_pretrained(directory, safe_serialization=True, max_shard_size="5GB")
    _byte_level_tokenizer().save_pretrained(str(directory))
    del model
    torch.cuda.empty_cache()
    return directory


def random_text(num_tokens: int, seed: int = 0) -> str:
    """Printable ASCII: one token per character under the byte-level tokenizer."""
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(32, 127, (num_tokens,), generator=generator)
    return "".join(map(chr, codes.tolist()))


def dump(path: Path, payload) -> None:
    Path(path).write_text(json.dumps(payload, indent=2))
