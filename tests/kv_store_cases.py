"""The steps and stores the KV store tests share: small shapes, uneven prefill chunks then decode
steps, a poisoned offloaded store and a device cache, fed layer by layer in model order."""

import torch

from facli.offload.device_cache import DeviceKVCache
from facli.offload.kv_store import OffloadedKVStore

LAYERS, BATCH, KV_HEADS, Q_HEADS, HEAD_DIM = 4, 2, 2, 8, 64
CHUNKS = [7, 13, 1, 20]  # uneven prefill chunks, then decode steps of one token
DECODE_STEPS = 10
CAPACITY = sum(CHUNKS) + DECODE_STEPS + 3


def _steps(dtype=torch.float32, device="cpu"):
    """[(start, q, k, v)] for the prefill chunks, then decode steps; q, k, v [L, B, T, H, D]."""
    steps, start = [], 0
    for size in CHUNKS + [1] * DECODE_STEPS:
        shape = (LAYERS, BATCH, size)
        q = torch.randn(*shape, Q_HEADS, HEAD_DIM, dtype=dtype, device=device)
        k = torch.randn(*shape, KV_HEADS, HEAD_DIM, dtype=dtype, device=device)
        v = torch.randn(*shape, KV_HEADS, HEAD_DIM, dtype=dtype, device=device)
        steps.append((start, q, k, v))
        start += size
    return steps


def _run(store, steps):
    """Outputs of every step and layer, [L, B, total, Hq, D], feeding layers in model order."""
    outs = [[store.attend(layer, q[layer], k[layer], v[layer], start) for layer in range(LAYERS)]
            for start, q, k, v in steps]
    return torch.stack([torch.cat([step[layer] for step in outs], dim=1)
                        for layer in range(LAYERS)])


def _device_cache(dtype=torch.float32, device="cpu"):
    cache = DeviceKVCache(LAYERS, BATCH, CAPACITY, KV_HEADS, HEAD_DIM, dtype, torch.device(device))
    # The reference decode multiplies masked rows by 0, so unwritten rows must not hold NaN.
    cache.keys.zero_()
    cache.values.zero_()
    return cache


def _offloaded(host_layers, mode, dtype=torch.float32, device="cpu", **options):
    """A poisoned store; unpacked unless asked, so that host rows take the mode's own path."""
    options.setdefault("pack_slots", False)
    store = OffloadedKVStore(LAYERS, BATCH, CAPACITY, KV_HEADS, HEAD_DIM, dtype,
                             torch.device(device), frozenset(host_layers), mode, **options)
    _poison(store)
    return store


def _poison(store):
    """NaN-fill every buffer of the store, so reading an unwritten row fails the comparison."""
    parts = [p for p in store._dev + store._host + [store._raw] if p is not None]
    tensors = [t for p in parts for t in p.tensors()]
    tensors += [t for s in store._slots for t in (s.keys, s.values)]
    for tensor in tensors:
        if tensor.dtype == torch.float8_e4m3fn:
            tensor.view(torch.uint8).fill_(0x7F)  # e4m3fn's NaN, whatever fill_ supports
        else:
            tensor.fill_(float("nan"))
