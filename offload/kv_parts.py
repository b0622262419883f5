"""Storage pieces of the offloaded KV store: a run of cached positions, and staging slots.

A `KVPart` holds K and V for a contiguous run of positions of one layer, on the GPU or in
(pinned) host memory, either in the model dtype or as fp8 values with per-token-per-head
scales. A `Slot` is one half of the GPU staging double buffer: a whole layer's worth of K and V
in the model dtype, plus which layer and how many of its positions it currently holds.
"""

from dataclasses import dataclass, field

import torch

from facli.offload.fp8 import FP8, dequantize_into, quantize


def copy_rows(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst.copy_(src), queued asynchronously across devices, one sequence at a time.

    A row range of a [B, T, ...] buffer is contiguous per sequence but not across them when
    B > 1, and torch copies a non-contiguous host tensor through a pageable, synchronous
    temporary; per-sequence slices keep host-device copies direct and asynchronous.
    """
    for index in range(dst.shape[0]):
        dst[index].copy_(src[index], non_blocking=True)


@dataclass
class Chunk:
    """New K/V of one step in storage format: k, v [B, T, Hkv, D] (+ scales [B, T, Hkv])."""

    k: torch.Tensor
    v: torch.Tensor
    k_scales: torch.Tensor | None = None
    v_scales: torch.Tensor | None = None

    @classmethod
    def encode(cls, k, v, dtype, fp8: bool) -> "Chunk":
        if not fp8:
            return cls(k.to(dtype), v.to(dtype))
        (k8, ks), (v8, vs) = quantize(k), quantize(v)
        return cls(k8, v8, ks, vs)

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.k, self.v, self.k_scales, self.v_scales) if t is not None]


class KVPart:
    """K and V of `length` consecutive positions: [B, length, Hkv, D] each, plus scales
    [B, length, Hkv] if fp8.

    head_major_scales stores the scales [B, Hkv, length] behind the same view, so that one head's
    scales lie together: the decode kernel reads them a tile of positions at a time, and a
    position-major layout spends a 32-byte memory sector on each 4-byte scale (6-13% of an fp8
    decode on an H200, benchmarks/decode_rows.py --scales). Host parts keep position-major
    scales: their copies to and from the GPU go by contiguous runs of positions.
    """

    def __init__(self, batch, length, kv_heads, head_dim, dtype, fp8: bool, allocate,
                 head_major_scales: bool = False):
        self.fp8 = fp8
        shape = (batch, length, kv_heads, head_dim)
        self.k = allocate(shape, FP8 if fp8 else dtype)
        self.v = allocate(shape, FP8 if fp8 else dtype)
        self.k_scales = self.v_scales = None
        if fp8 and head_major_scales:
            self.k_scales, self.v_scales = (allocate((batch, kv_heads, length), torch.float32)
                                            .transpose(1, 2) for _ in range(2))
        elif fp8:
            self.k_scales, self.v_scales = (allocate(shape[:3], torch.float32) for _ in range(2))

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.k, self.v, self.k_scales, self.v_scales) if t is not None]

    def row(self, index: int) -> "KVPart":
        """Sequence `index` as a part of batch 1, sharing this part's memory."""
        return self._view((slice(index, index + 1),))

    def first(self, stop: int) -> "KVPart":
        """Positions 0..stop of every sequence, sharing this part's memory."""
        return self._view((slice(None), slice(0, stop)))

    def _view(self, at: tuple) -> "KVPart":
        view = KVPart.__new__(KVPart)
        view.fp8 = self.fp8
        view.k, view.v, view.k_scales, view.v_scales = (
            None if t is None else t[at] for t in (self.k, self.v, self.k_scales, self.v_scales))
        return view

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def row_bytes(self) -> int:
        """Bytes of one position (all sequences, K and V, scales included)."""
        return sum(t[:, :1].numel() * t.element_size() for t in self.tensors())

    def store(self, row: int, chunk: Chunk, first: int, count: int) -> None:
        """Rows row..row+count of this part = rows first..first+count of `chunk` (async-safe)."""
        for dst, src in zip(self.tensors(), chunk.tensors()):
            copy_rows(dst[:, row:row + count], src[:, first:first + count])

    def read(self, stop: int, dtype, first: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of rows first..stop in `dtype` (views when not fp8, new tensors when fp8)."""
        rows = slice(first, stop)
        if not self.fp8:
            return self.k[:, rows], self.v[:, rows]
        keys = torch.empty(self.k[:, rows].shape, dtype=dtype, device=self.k.device)
        values = torch.empty_like(keys)
        dequantize_into(keys, self.k[:, rows], self.k_scales[:, rows])
        dequantize_into(values, self.v[:, rows], self.v_scales[:, rows])
        return keys, values

    def load_into(self, keys, values, dst: int, src: int, count: int, raw=None) -> None:
        """keys/values[:, dst:dst+count] = rows src..src+count, dequantized, on keys' device.

        A host fp8 part goes through `raw` (a device KVPart of R rows) R rows at a time: the
        fp8 bytes cross PCIe, the dequantization runs on the GPU.
        """
        if not self.fp8:
            copy_rows(keys[:, dst:dst + count], self.k[:, src:src + count])
            copy_rows(values[:, dst:dst + count], self.v[:, src:src + count])
            return
        if raw is None or self.k.device == keys.device:
            self._dequantize_rows(keys, values, dst, src, count)
            return
        step = raw.k.shape[1]
        for offset in range(0, count, step):
            n = min(step, count - offset)
            for to, frm in zip(raw.tensors(), self.tensors()):
                copy_rows(to[:, :n], frm[:, src + offset:src + offset + n])
            raw._dequantize_rows(keys, values, dst + offset, 0, n)

    def _dequantize_rows(self, keys, values, dst, src, count):
        rows = slice(src, src + count)
        dequantize_into(keys[:, dst:dst + count], self.k[:, rows], self.k_scales[:, rows])
        dequantize_into(values[:, dst:dst + count], self.v[:, rows], self.v_scales[:, rows])


@dataclass
class Slot:
    """Half of the staging double buffer. Positions 0..length of `layer` are valid in keys/values
    once `ready` has happened; `free` are the events after which it may be overwritten."""

    keys: torch.Tensor
    values: torch.Tensor
    layer: int | None = None
    length: int = 0
    last_use: int = -1
    ready: object = None
    free: list = field(default_factory=list)

    def holds(self, layer: int, length: int) -> bool:
        return self.layer == layer and self.length >= length
