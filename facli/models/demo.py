"""`--model random-demo`: a small Llama with random weights and a byte-level tokenizer.

It exercises the whole pipeline on any machine in moments, offline; its text is gibberish.
facli writes it deterministically (seeded) into the user cache on first use.
"""

import hashlib
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from facli.errors import FacliError
from facli.models.cache import cache_dir, cache_setting, staging_dir
from facli.models.checkpoint import check_safetensors_header
from facli.models.config import ModelConfig

DEMO_NAME = "demo-llama-v2"
DEMO_SEED = 20261121
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")
WEIGHTS_FILE = "model.safetensors"
# Written last into a built demo: each file's size (and hash, but for the weights), so that a
# cut-short or damaged copy is found and built again.
MANIFEST = "facli-demo.json"
_REQUIRED_FILES = {"config.json", WEIGHTS_FILE, "tokenizer.json"}
MANIFEST_LIMIT = 1 << 20
BUILT = "checkpoint"  # the folder in a staging dir that is renamed into place
NOT_THERE = "it is not there"

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


def demo_config() -> ModelConfig:
    return ModelConfig.from_dict(DEMO_CONFIG)


def ensure_demo_checkpoint() -> Path:
    """The demo checkpoint's directory, written on first use and written again where the cached
    one is incomplete or damaged; either way built in a temp dir and renamed into place."""
    target = cache_dir() / DEMO_NAME
    problem = demo_problem(target)
    if problem is None:
        return target
    if problem != NOT_THERE:
        print(f"facli: the demo model in {target} is unusable ({problem}); writing it again",
              file=sys.stderr)
    staging = staging_dir(target.parent, DEMO_NAME, "the demo model is written there on first use")
    try:
        try:
            _write_checkpoint(staging)
        except (OSError, SafetensorError) as exc:
            setting, fix = cache_setting()
            raise FacliError(f"expected room to write the demo model in {target.parent} (from "
                             f"{setting}), got: {exc}; free some space there, or {fix}") from None
        _swap_in(staging, target, problem)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def demo_problem(directory: Path) -> str | None:
    """Why the demo checkpoint in `directory` cannot be used as it is, or None where it can:
    every file the manifest lists is there, whole (small files by hash, the weights by size and
    safetensors header), and config.json is the demo's."""
    if not directory.exists():
        return NOT_THERE if not directory.is_symlink() else "it is a broken link"
    if not directory.is_dir():
        return "it is not a folder"
    try:
        with (directory / MANIFEST).open("rb") as handle:
            manifest = json.loads(handle.read(MANIFEST_LIMIT))
        files = manifest["files"]
        for name, expected in files.items():
            path = directory / name
            if not path.is_file():
                return f"{name} is missing"
            size = path.stat().st_size
            if size != expected["bytes"]:
                return f"{name} holds {size} bytes, not {expected['bytes']}"
            if "sha256" in expected and _sha256(path) != expected["sha256"]:
                return f"{name} differs from the one written"
        if manifest.get("name") != DEMO_NAME or not _REQUIRED_FILES <= set(files):
            return "its manifest is not this version's"
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"its {MANIFEST} is missing or unreadable"
    try:
        check_safetensors_header(directory / WEIGHTS_FILE)
    except FacliError:
        return f"{WEIGHTS_FILE} is corrupt"
    return None


def _swap_in(staging: Path, target: Path, problem: str) -> None:
    """Rename the built checkpoint into place. What was there moves aside first (then goes with
    the staging dir), so a reader never finds a half-written demo; a good one another process
    put there in the meantime is kept."""
    aside = staging / "replaced"
    try:
        now = demo_problem(target)
        if now is None:
            return  # another process built it meanwhile
        if now != NOT_THERE:
            target.rename(aside)
        try:
            # Fails where another process renamed its own demo into place since: that one stays.
            staging.joinpath(BUILT).rename(target)
        except OSError:
            if aside.exists() and not target.exists():
                aside.rename(target)  # leave things as they were found, for the message below
            raise
    except OSError as exc:
        if demo_problem(target) is None:
            return
        raise FacliError(
            f"expected a usable demo model in {target} ({problem}), and facli could not put a "
            f"new one there: {exc.strerror or exc}; delete {target} and run again"
        ) from None


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_checkpoint(staging: Path) -> None:
    """The demo checkpoint in staging/BUILT, its manifest written last."""
    directory = staging / BUILT
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(DEMO_CONFIG, indent=2))
    tokenizer = byte_level_tokenizer()
    printable = [tokenizer.convert_tokens_to_ids(token)
                 for token in tokenizer.tokenize("".join(map(chr, range(32, 127))))]
    save_file(_random_weights(demo_config(), printable), str(directory / WEIGHTS_FILE),
              metadata={"format": "pt"})
    tokenizer.save_pretrained(str(directory))
    files = {}
    for path in sorted(directory.iterdir()):
        entry = {"bytes": path.stat().st_size}
        if path.name != WEIGHTS_FILE:  # the weights: size and header; hashing costs ~0.2 s a run
            entry["sha256"] = _sha256(path)
        files[path.name] = entry
    (directory / MANIFEST).write_text(json.dumps({"name": DEMO_NAME, "files": files}, indent=2))


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
