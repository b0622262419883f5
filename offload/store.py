"""The KV cache contract: what the model needs from a KV store.

The model hands each layer's new keys and values to a KV store and gets the attention output
back; where the cache lives (GPU, pinned host, CPU-computed attention) is the store's business:
DeviceKVCache (facli.offload.device_cache) keeps every layer on one device, OffloadedKVStore
(facli.offload.kv_store) keeps some in pinned host memory, and facli.offload.build picks the
one a plan describes.
"""

from typing import Protocol

import torch


class KVStore(Protocol):
    """What the model needs from a cache. Shapes: q [B, T, Hq, D]; k, v [B, T, Hkv, D]."""

    capacity: int
    # Layers whose single-token attend also takes `start` as a one-element device tensor and is
    # then device work only: their decode steps can be captured in CUDA graphs (facli.run.graphs).
    graph_layers: frozenset

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               start: int, rotary: tuple | None = None) -> torch.Tensor:
        """Store k, v at positions start..start+T of `layer` and return attention [B, T, Hq, D]
        of q (at the same positions) over positions 0..start+T, causal. A decode step's `start`
        may be a [B] device tensor (see `graph_layers`); it comes with rotary = (cos, sin) and q,
        k unrotated, rotated as k is stored (kernels.elementwise.rotate_and_store_token)."""
        ...

    def reset(self) -> None:
        """Forget all positions (the next attend starts at 0)."""
        ...
