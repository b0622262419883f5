"""fp8 half of the FastAttention prefill benchmark (benchmarks/attention.py --fp8 runs it): causal
prefill over an fp8 KV cache (e4m3 plus a float32 scale per token and KV head, as the offloaded
store keeps its GPU rows) against the bf16 kernels over the same keys in bf16.

Each row is one call: the whole prompt of T tokens (queries = T), or its last chunk (queries =
the chunk, over T keys), as prefill in chunks ends. Columns:
- bf16 facli, bf16 Triton: `prefill_attention` (on Hopper the Gluon kernel) and the portable
  Triton kernel with the table's config, over the bf16 K/V;
- fp8 kernel: `prefill_attention` with k_scales/v_scales, the Triton kernel reading e4m3 and the
  scales itself (table config: on Hopper K/V tiles through the copy engine); fp8 plain loads:
  the same block sizes without the copy engine;
- store: what OffloadedKVStore's prefill runs over its fp8 GPU rows (on Hopper the fp8 kernel);
  tiles: its path elsewhere, FP8_TILE-row tiles dequantized to bf16, each through the bf16 kernel,
  merged by LSE.
TF/s count the causal FLOPs as attention.py does: 4 * Hq * D * (queries * prefix + queries^2 / 2).
"""

from dataclasses import replace

import torch

from facli.kernels import prefill_attention
from facli.kernels.configs import prefill_config
from facli.kernels.prefill import prefill_attention_triton
from facli.offload.fp8 import dequantize
from facli.offload.kv_store import OffloadedKVStore
from gpu_timing import try_ms

COLUMNS = {"bf16": "bf16 facli", "bf16_triton": "bf16 Triton", "fp8": "fp8 kernel",
           "fp8_plain": "fp8 plain loads", "store": "store", "tiles": "tiles"}


def fp8_store(k, v):
    """A one-layer fp8 store whose GPU rows hold k, v [1, T, H, D], quantized as prefill does."""
    _, seq, heads, d = k.shape
    store = OffloadedKVStore(1, 1, seq, heads, d, k.dtype, k.device, kv_dtype="fp8")
    store.write(0, k, v, 0)
    return store


def fp8_prefill_row(seq, queries, heads=32, d=128, device="cuda"):
    """Times and TF/s of every column for `queries` causal queries at the end of `seq` keys,
    and each fp8 path's relative L2 difference to the bf16 kernel over the dequantized cache."""
    start = seq - queries
    q = torch.randn(1, queries, heads, d, device=device, dtype=torch.bfloat16)
    k, v = (torch.randn(1, seq, heads, d, device=device, dtype=torch.bfloat16) for _ in range(2))
    store = fp8_store(k, v)
    part = store._dev[0]
    scales = {"k_scales": part.k_scales, "v_scales": part.v_scales}
    table = prefill_config(q.device, d, queries, causal=True, dtype=q.dtype)
    plain = replace(table, tma=False, warp_specialize=False)
    calls = {
        "bf16": lambda: prefill_attention(q, k, v, q_offset=start),
        "bf16_triton": lambda: prefill_attention_triton(q, k, v, q_offset=start),
        "fp8": lambda: prefill_attention(q, part.k, part.v, q_offset=start, **scales),
        "fp8_plain": lambda: prefill_attention_triton(q, part.k, part.v, q_offset=start,
                                                      config=plain, **scales),
        "store": lambda: store._fp8_attention(q, part, start, seq),
        "tiles": lambda: store._tiled_attention(q, part, start, own=(start, seq))[0],
    }
    flops = 4 * heads * d * (queries * start + queries * queries / 2)
    budget = 0.4 if seq <= 16384 else 0.05
    row = {"T": seq, "queries": queries, "Hq": heads, "Hkv": heads, "D": d}
    for name, call in calls.items():
        row[name] = try_ms(call, budget_s=budget)
        row[name + "_tflops"] = None if row[name] is None else flops / row[name] / 1e9
    del k, v
    deq_k, deq_v = (dequantize(t, s, torch.bfloat16) for t, s in
                    ((part.k, part.k_scales), (part.v, part.v_scales)))
    ref = prefill_attention(q, deq_k, deq_v, q_offset=start).float()
    del deq_k, deq_v
    for name in ("fp8", "store", "tiles"):
        out = calls[name]().float()
        row[name + "_rel_diff"] = ((out - ref).norm() / ref.norm()).item()
    return row


def print_fp8_table(rows, fmt):
    print("\ncausal prefill over an fp8 KV cache (e4m3 + float32 scale per token and head) against "
          "bf16, B=1, Hq=Hkv=32, D=128, TF/s")
    ratios = (("store", "bf16"), ("tiles", "bf16"), ("fp8_plain", "bf16_triton"))
    print("| T | queries | " + " | ".join(COLUMNS.values()) + " | "
          + " | ".join(f"{COLUMNS[a]}/{COLUMNS[b]}" for a, b in ratios)
          + " | rel diff fp8 kernel, store, tiles |")
    print("| --- " * (len(COLUMNS) + len(ratios) + 3) + "|")
    for r in rows:
        tf = {name: r.get(name + "_tflops") for name in COLUMNS}
        shares = [tf[a] / tf[b] if tf[a] and tf[b] else None for a, b in ratios]
        diffs = ", ".join(fmt(r.get(name + "_rel_diff"), 4) for name in ("fp8", "store", "tiles"))
        print(f"| {r['T'] // 1024}K | {r['queries'] // 1024}K | "
              + " | ".join(fmt(tf[name]) for name in COLUMNS) + " | "
              + " | ".join(fmt(share, 2) for share in shares) + f" | {diffs} |")
