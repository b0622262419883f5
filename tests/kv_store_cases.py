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


def _stored_rows64(store, layer):
    """K and V of every position of an fp8 store's layer as it holds them (GPU rows, then host
    rows), dequantized exactly in float64: [B, capacity, Hkv, D] each."""
    parts = [p for p in (store._dev[layer], store._host[layer]) if p is not None]
    def rows64(part, name):
        return (getattr(part, name).double() * getattr(part, name + "_scales").double()[..., None]).cpu()

    return [torch.cat([rows64(p, name) for p in parts], dim=1) for name in ("k", "v")]


def _attention_over_stored_rows(store, steps):
    """float64 attention of every step over the rows as an fp8 store holds them, and PyTorch's
    attention over those rows dequantized to the steps' dtype; [L, B, total, Hq, D] each."""
    from kernel_checks import oracle, sdpa_same_dtype  # imports Triton, which only Linux has

    want, same_dtype = [], []
    for layer in range(LAYERS):
        k64, v64 = _stored_rows64(store, layer)
        outs = []
        for start, q, _, _ in steps:
            stop = start + q.shape[2]
            k, v = k64[:, :stop], v64[:, :stop]
            ref = oracle(q[layer], k, v, causal=True, q_offset=start, device=q.device)[0]
            base = sdpa_same_dtype(q[layer], k.to(q.device, q.dtype), v.to(q.device, q.dtype),
                                   causal=True, q_offset=start)
            outs.append((ref.cpu(), base.cpu()))
        want.append(torch.cat([o[0] for o in outs], dim=1))
        same_dtype.append(torch.cat([o[1] for o in outs], dim=1))
    return torch.stack(want), torch.stack(same_dtype)
