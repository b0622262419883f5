"""Lazy, by-name reading of safetensors checkpoints (single file or sharded with an index).

Nothing is read until a tensor is asked for, and a tensor-parallel rank asks only for its slice
(`safe_open(...).get_slice`), so no rank ever holds the full model.
"""

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from facli.errors import FacliError
from facli.models.json_fields import read_json_object, shown

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# A weight map names every tensor once: a few MiB even for the largest checkpoints.
INDEX_LIMIT = 64 << 20
# The safetensors library refuses headers larger than this (its MAX_HEADER_SIZE).
HEADER_LIMIT = 100_000_000


@dataclass(frozen=True)
class Shard:
    """Which part of a tensor a rank reads: slice `rank` of `world` equal parts along `dim`."""

    dim: int
    rank: int
    world: int


class CheckpointReader:
    """Maps tensor names to their safetensors file and reads them (or a shard) on demand."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self._handles: dict[Path, object] = {}
        self._file_of = self._index_files()

    def _index_files(self) -> dict[str, Path]:
        index = self.directory / INDEX_FILE
        if index.is_file():
            weight_map = read_json_object(index, INDEX_LIMIT).get("weight_map")
            plain = isinstance(weight_map, dict) and all(
                isinstance(file, str) and file and Path(file).name == file
                for file in weight_map.values())
            if not plain:
                raise FacliError(
                    f"expected a weight_map in {index} from tensor names to file names in "
                    f"{self.directory}, got {shown(weight_map)}; re-export the checkpoint"
                )
            return {name: self.directory / file for name, file in weight_map.items()}
        single = self.directory / SINGLE_FILE
        if not single.is_file():
            raise FacliError(
                f"expected {SINGLE_FILE} or {INDEX_FILE} in {self.directory}, found neither; "
                "facli reads safetensors checkpoints only"
            )
        return {name: single for name in self._open(single).keys()}

    def _open(self, path: Path):
        if path not in self._handles:
            if not path.is_file():
                raise FacliError(f"expected checkpoint file {path} (named in {INDEX_FILE}), it is missing")
            check_safetensors_header(path)
            try:
                self._handles[path] = safe_open(str(path), framework="pt")
            except (SafetensorError, OSError) as exc:
                raise FacliError(
                    f"expected a valid safetensors file at {path}, got: {exc}; the file is "
                    "corrupt or truncated, copy it again"
                ) from None
        return self._handles[path]

    def names(self) -> list[str]:
        return sorted(self._file_of)

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def read(self, name: str, shape: tuple[int, ...], dtype: torch.dtype,
             device: torch.device, shard: Shard | None = None) -> torch.Tensor:
        """Read `name`, check it has the full `shape`, and return it (or its shard) as `dtype` on `device`."""
        if name not in self._file_of:
            raise FacliError(
                f"expected tensor {name!r} in the checkpoint at {self.directory}, it is missing; "
                "the checkpoint does not match its config.json"
            )
        path = self._file_of[name]
        tensor_slice = self._open(path).get_slice(name)
        found = tuple(tensor_slice.get_shape())
        if found != tuple(shape):
            raise FacliError(
                f"expected tensor {name!r} of shape {tuple(shape)} (from config.json), got {found}"
            )
        try:
            tensor = _read_slice(tensor_slice, shape, shard)
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise FacliError(f"could not read tensor {name!r} from {path}: {exc}; the file is corrupt") from None
        return tensor.to(device=device, dtype=dtype)


def _read_slice(tensor_slice, shape, shard: Shard | None) -> torch.Tensor:
    if shard is None or shard.world == 1:
        return tensor_slice[:]
    size = shape[shard.dim]
    assert size % shard.world == 0, f"dimension {size} not divisible by {shard.world}"
    part = size // shard.world
    index = [slice(None)] * len(shape)
    index[shard.dim] = slice(shard.rank * part, (shard.rank + 1) * part)
    return tensor_slice[tuple(index)]


def check_safetensors_header(path: Path) -> None:
    """Catch truncated files before safetensors maps them: the header's offsets must fit the file."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        raw = handle.read(8)
        if len(raw) < 8:
            raise FacliError(f"expected a safetensors file at {path}, got {size} bytes; copy it again")
        header_len = struct.unpack("<Q", raw)[0]
        if header_len > size - 8:
            raise FacliError(f"expected a safetensors header of {header_len} bytes in {path}, the file is truncated")
        if header_len > HEADER_LIMIT:
            raise FacliError(f"expected a safetensors header of at most {HEADER_LIMIT} bytes in "
                             f"{path}, got {header_len}: the file is corrupt; copy it again")
        try:
            header = json.loads(handle.read(header_len))
        except (ValueError, RecursionError):
            header = None
    entries = [entry for key, entry in header.items() if key != "__metadata__"] \
        if isinstance(header, dict) else None
    if entries is None or not all(_offsets(entry) for entry in entries):
        raise FacliError(f"expected a JSON header in safetensors file {path}, it is corrupt; "
                         "copy it again")
    data_end = max((_offsets(entry)[1] for entry in entries), default=0)
    if 8 + header_len + data_end > size:
        raise FacliError(
            f"expected {8 + header_len + data_end} bytes in {path}, got {size}: the file is truncated; copy it again"
        )


def _offsets(entry) -> tuple[int, int] | None:
    """A header entry's (start, end) data offsets, None where the entry has none."""
    offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
    if (isinstance(offsets, list) and len(offsets) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in offsets)
            and offsets[0] <= offsets[1]):
        return offsets[0], offsets[1]
    return None
