"""GGUF files as ordinary checkpoints: transformers' GGUF reader dequantizes the file once into a
Hugging Face folder in the cache, keyed by the file's content, which every command then loads.

The folder holds float32 weights (the dequantized values exactly), the tokenizer and chat
template from the file, and the config; `--dtype auto` then computes in float32 on the CPU and
bfloat16 on GPUs, as for any float32 checkpoint.
"""

import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from facli.errors import FacliError
from facli.models.cache import staging_dir
from facli.models.config import SUPPORTED_MODEL_TYPES, ModelConfig

GGUF_MAGIC = b"GGUF"
CONVERTED = "facli-gguf.json"  # written last into a converted folder: its source and digest
STAT_INDEX = "by-stat.json"  # (path, size, mtime) -> digest, so that a known file is not hashed again
INDEX_LIMIT = 4 << 20  # bytes; the index is facli's own small file
HASH_CHUNK = 8 << 20
# Tensor encodings that need no dequantization; the others go through gguf's dequantizers.
PLAIN_TYPES = ("F32", "F16", "BF16")


@dataclass(frozen=True)
class GgufInfo:
    """What facli checks in a GGUF file before converting it."""

    path: Path
    architecture: str
    tensor_types: tuple[str, ...]


def gguf_file_in(path: Path) -> Path | None:
    """The GGUF file `--model` names: the file itself, or the one .gguf in a folder without a
    config.json. None where `path` is neither."""
    if path.is_file():
        return path if path.suffix.lower() == ".gguf" else None
    if not path.is_dir() or (path / "config.json").exists():
        return None
    found = sorted(p for p in path.iterdir() if p.suffix.lower() == ".gguf" and p.is_file())
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise FacliError(f"expected one .gguf file in {path}, found {len(found)} ({names}); "
                         "pass the one to use as --model")
    return found[0] if found else None


def inspect_gguf(path: Path) -> GgufInfo:
    """Read the header and refuse what facli cannot run: another format, an architecture facli
    does not implement, a tensor encoding gguf cannot dequantize."""
    with path.open("rb") as handle:
        magic = handle.read(len(GGUF_MAGIC))
    if magic != GGUF_MAGIC:
        raise FacliError(f"expected a GGUF file (starting with 'GGUF'), got {path} starting "
                         f"with {magic!r}")
    gguf = _import_gguf()
    try:
        reader = gguf.GGUFReader(str(path))
        field = reader.fields["general.architecture"]
        architecture = bytes(field.parts[field.data[0]]).decode("utf-8")
        types = tuple(sorted({tensor.tensor_type.name for tensor in reader.tensors}))
    except (KeyError, ValueError, IndexError, UnicodeDecodeError, OSError) as error:
        raise FacliError(f"expected a readable GGUF file, {path} is damaged or truncated "
                         f"({type(error).__name__}: {error})") from None
    if architecture not in SUPPORTED_MODEL_TYPES:
        raise FacliError(f"expected a GGUF model of architecture {', '.join(SUPPORTED_MODEL_TYPES)}, "
                         f"got {architecture!r} in {path}")
    unknown = [name for name in types if name not in PLAIN_TYPES and not _dequantizable(gguf, name)]
    if unknown:
        raise FacliError(f"expected GGUF tensors that the gguf package can dequantize, got "
                         f"{', '.join(unknown)} in {path}; convert the file with another "
                         "quantization (e.g. Q8_0, Q4_K_M)")
    return GgufInfo(path, architecture, types)


def converted_checkpoint(path: Path, cache: Path) -> Path:
    """The Hugging Face folder of the GGUF file `path`, converted into `cache` on first use.

    The conversion writes into a staging folder and renames it into place, so an interrupted
    one leaves nothing that looks complete."""
    path = path.resolve()
    root = cache / "gguf"
    staging = staging_dir(root, "convert", "converted GGUF models are written there once")
    try:
        return _converted_into(path, root, staging)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _converted_into(path: Path, root: Path, staging: Path) -> Path:
    digest = _content_digest(path, root)
    target = root / f"{path.stem}-{digest[:16]}"
    if _is_converted(target, digest):
        return target
    info = inspect_gguf(path)
    if target.exists():
        shutil.rmtree(target, ignore_errors=True)  # a copy from an older facli, or damaged
    print(f"facli: converting {path.name} ({info.architecture}; {', '.join(info.tensor_types)}) "
          f"into {target} once", file=sys.stderr, flush=True)
    try:
        _convert(path, staging / "checkpoint")
        (staging / "checkpoint" / CONVERTED).write_text(
            json.dumps({"source": str(path), "sha256": digest}) + "\n")
        try:
            os.rename(staging / "checkpoint", target)
        except OSError:
            if not _is_converted(target, digest):  # another process may have won the race
                raise
    except OSError as error:
        raise FacliError(f"expected to write the converted model into {root}, got "
                         f"{error.strerror or error}; free disk space or set FACLI_CACHE") from None
    return target


def _convert(path: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(path.parent), path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except (ValueError, NotImplementedError, KeyError) as error:
        raise FacliError(f"expected a GGUF model transformers can read, got {path}: "
                         f"{str(error).splitlines()[0]}") from None
    # The weights are plain float32 now; the GGUF quantizer would otherwise ride along into
    # config.json and make save_pretrained refuse.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _content_digest(path: Path, root: Path) -> str:
    """sha256 of the file, remembered by (path, size, mtime) so a second run does not read it."""
    stat = path.stat()
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
    index_path = root / STAT_INDEX
    index = _read_index(index_path)
    if key in index:
        return index[key]
    sha = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            sha.update(chunk)
    index[key] = sha.hexdigest()
    scratch = index_path.with_suffix(f".{os.getpid()}.tmp")
    scratch.write_text(json.dumps(index))
    os.replace(scratch, index_path)
    return index[key]


def _read_index(index_path: Path) -> dict:
    try:
        if index_path.stat().st_size > INDEX_LIMIT:
            return {}
        index = json.loads(index_path.read_text())
    except (OSError, ValueError):
        return {}  # missing or damaged: the files are hashed again
    return index if isinstance(index, dict) else {}


def _is_converted(target: Path, digest: str) -> bool:
    marker = target / CONVERTED
    try:
        if marker.stat().st_size > INDEX_LIMIT:
            return False
        return json.loads(marker.read_text()).get("sha256") == digest
    except (OSError, ValueError, AttributeError):
        return False


def _dequantizable(gguf, type_name: str) -> bool:
    """Whether gguf's dequantizer knows this encoding (it raises NotImplementedError if not)."""
    import numpy as np

    qtype = gguf.GGMLQuantizationType[type_name]
    block, type_bytes = gguf.GGML_QUANT_SIZES[qtype]
    try:
        gguf.quants.dequantize(np.zeros((1, type_bytes), dtype=np.uint8), qtype)
    except NotImplementedError:
        return False
    return True


def _import_gguf():
    try:
        import gguf
        import gguf.quants
    except ImportError:
        raise FacliError("expected the gguf package to read GGUF files; pip install gguf") from None
    return gguf


def gguf_model_config(path: Path):
    """The ModelConfig of a GGUF file from its header alone (for planning before any weights
    are read or converted)."""
    from transformers import AutoConfig  # here, not at the top: `facli` starts without it

    inspect_gguf(path)
    try:
        config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    except (ValueError, KeyError) as error:
        raise FacliError(f"expected a GGUF model transformers can read, got {path}: "
                         f"{str(error).splitlines()[0]}") from None
    values = config.to_dict()
    values.setdefault("torch_dtype", "float32")
    return ModelConfig.from_dict(values, source=str(path))
