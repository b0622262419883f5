"""DeviceKVCache: the KV store (facli.offload.store.KVStore) that keeps every layer on the run's
device: the all-GPU cache, and a CPU run's cache."""

import torch

from facli.kernels import decode_attention, elementwise, prefill_attention


class DeviceKVCache:
    """Preallocated [B, capacity, Hkv, D] K and V per layer on one device.

    `start` may also be an int64 device tensor [B] for a decode step (T = 1), one position per
    sequence: then no host value is read, so the whole step can be captured in a CUDA graph and
    replayed, and the B sequences of a batch may each be at their own length.
    """

    def __init__(self, num_layers: int, batch: int, capacity: int, kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device):
        self._use(_cache_tensor(num_layers, batch, capacity, kv_heads, head_dim, dtype, device),
                  _cache_tensor(num_layers, batch, capacity, kv_heads, head_dim, dtype, device),
                  torch.zeros(batch, dtype=torch.int32, device=device))

    def _use(self, keys: torch.Tensor, values: torch.Tensor, lens: torch.Tensor) -> None:
        self.keys, self.values, self._lens = keys, values, lens
        self.batch, self.capacity = keys.shape[1], keys.shape[2]
        self.graph_layers = frozenset(range(keys.shape[0]))  # every layer takes tensor positions
        self._rows = torch.arange(self.batch, device=keys.device)

    @staticmethod
    def bytes_needed(num_layers, batch, capacity, kv_heads, head_dim, element_size) -> int:
        return 2 * num_layers * batch * capacity * kv_heads * head_dim * element_size

    def row(self, index: int) -> "DeviceKVCache":
        """Sequence `index` of the batch as a cache of its own (batch 1), sharing this one's
        memory: a prompt is prefilled into one row while the others wait mid-generation."""
        view = DeviceKVCache.__new__(DeviceKVCache)
        rows = slice(index, index + 1)
        view._use(self.keys[:, rows], self.values[:, rows], self._lens[rows])
        return view

    def attend(self, layer, q, k, v, start, rotary=None):
        if isinstance(start, torch.Tensor):
            return self._attend_at(layer, q, k, v, start, rotary)
        stop = start + k.shape[1]
        if stop > self.capacity:
            raise ValueError(f"KV cache holds {self.capacity} positions, asked for {stop}")
        keys, values = self.keys[layer], self.values[layer]
        keys[:, start:stop] = k
        values[:, start:stop] = v
        if q.shape[1] == 1 and keys.is_cuda:
            self._lens.fill_(stop)
            return decode_attention(q, keys[:, :stop], values[:, :stop], self._lens)
        # On the CPU a decode step too: its position is a host int, no length tensor to keep.
        return prefill_attention(q, keys[:, :stop], values[:, :stop], causal=True, q_offset=start)

    def _attend_at(self, layer, q, k, v, positions: torch.Tensor, rotary):
        assert q.shape[1] == 1 and rotary is not None, "tensor positions are for decode steps"
        keys, values = self.keys[layer], self.values[layer]
        q = elementwise.rotate_and_store_token(q, k, v, *rotary, keys, values, positions)
        if layer == 0:
            self._lens.copy_(positions + 1)
        if not keys.is_cuda:  # no graph to keep static: read no further than the longest row
            stop = int(positions.max()) + 1
            keys, values = keys[:, :stop], values[:, :stop]
        return decode_attention(q, keys, values, self._lens)

    def reset(self):
        self._lens.zero_()


def _cache_tensor(num_layers, batch, capacity, kv_heads, head_dim, dtype, device) -> torch.Tensor:
    """[L, B, capacity, Hkv, D]. On the CPU the memory is head-major ([L, B, Hkv, capacity, D]
    seen through a transpose): CPU attention reads each head's keys as one contiguous matrix,
    about twice as fast as gathering them across the token-major rows."""
    device = torch.device(device)
    if device.type != "cpu":
        return torch.empty(num_layers, batch, capacity, kv_heads, head_dim, dtype=dtype,
                           device=device)
    return torch.empty(num_layers, batch, kv_heads, capacity, head_dim, dtype=dtype,
                       device=device).transpose(2, 3)
