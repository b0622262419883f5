"""Decode half of the FastAttention benchmark (benchmarks/attention.py runs it): split-KV decode
GB/s against PyTorch SDPA as CUDA-graph replays, the block-size sweep, how often the asynchronous
softmax falls back to the exact path, and the host time of an eager call.
"""

import math
import os
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from facli.kernels.configs import DecodeConfig
from facli.kernels.decode import decode_attention_triton
from gpu_timing import graph_ms, log, sequence_graph_ms, try_graph_ms, try_ms

SDPA_BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                 "efficient": SDPBackend.EFFICIENT_ATTENTION}
DECODE_SWEEP = [DecodeConfig(128, 8, 3, 1), DecodeConfig(64, 4, 3, 2), DecodeConfig(32, 4, 4, 2)]


def decode_inputs(cache_len, q_heads, kv_heads, copies):
    q = torch.randn(1, 1, q_heads, 128, device="cuda", dtype=torch.bfloat16)
    caches = [(torch.randn(1, cache_len, kv_heads, 128, device="cuda", dtype=torch.bfloat16),
               torch.randn(1, cache_len, kv_heads, 128, device="cuda", dtype=torch.bfloat16))
              for _ in range(copies)]
    return q, caches


def hbm_copies(cache_len, kv_heads):
    """Cache copies to rotate over: >= 1 GiB in all, beyond L2, so every call reads HBM."""
    return max(1, (1 << 30) // (cache_len * kv_heads * 512))


def sdpa_fns(q, caches, backend=None):
    """One SDPA decode call per cache copy; backend None is SDPA's own dispatch."""
    qt = q.transpose(1, 2)
    gqa = caches[0][0].shape[2] != q.shape[2]

    def run(k, v):
        if backend is None:
            return F.scaled_dot_product_attention(qt, k, v, enable_gqa=gqa)
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(qt, k, v, enable_gqa=gqa)
    return [lambda k=k.transpose(1, 2), v=v.transpose(1, 2): run(k, v) for k, v in caches]


def rotating(fns):
    state = {"i": 0}

    def call():
        fns[state["i"] % len(fns)]()
        state["i"] += 1
    return call


def decode_row(cache_len, q_heads, kv_heads, cfg):
    """Decode step times as CUDA-graph replays (how the model runs decode), and eager."""
    q, caches = decode_inputs(cache_len, q_heads, kv_heads, hbm_copies(cache_len, kv_heads))
    lens = torch.tensor([cache_len], dtype=torch.int32, device="cuda")
    kv_bytes = 2 * cache_len * kv_heads * 128 * 2
    gqa = kv_heads != q_heads
    row = {"T": cache_len, "Hq": q_heads, "Hkv": kv_heads}
    facli = [lambda k=k, v=v: decode_attention_triton(q, k, v, lens, config=cfg) for k, v in caches]
    row["facli"] = try_graph_ms(facli)
    row["facli_seq"] = try_graph_ms(facli, sequence_graph_ms)
    row["facli_eager"] = try_ms(rotating(facli))
    for name, backend in [("sdpa", None), *SDPA_BACKENDS.items()]:
        fns = sdpa_fns(q, caches, backend)
        try:
            fns[0]()
        except Exception as exc:
            log(f"  {name} skipped: {str(exc).splitlines()[0][:100]}")
            row[name] = None
            continue
        row[name] = try_graph_ms(fns)
        row[name + "_seq"] = try_graph_ms(fns, sequence_graph_ms)
        if name == "sdpa":
            row["sdpa_eager"] = try_ms(rotating(fns))
    for key in ("facli", "sdpa", *SDPA_BACKENDS):
        for timing in (key, key + "_seq"):
            if row.get(timing) is not None:
                row[timing + "_gbs"] = kv_bytes / row[timing] / 1e6
    fast = [b for b in ("sdpa", *SDPA_BACKENDS) if row.get(b) is not None]
    row["best_sdpa_ms"] = min(row[b] for b in fast) if fast else None
    seq = [row[b + "_seq"] for b in fast if row.get(b + "_seq") is not None]
    row["best_sdpa_seq_ms"] = min(seq) if seq else None
    k, v = caches[0]
    err_ref = F.scaled_dot_product_attention(q.transpose(1, 2).float(), k.transpose(1, 2).float(),
                                             v.transpose(1, 2).float(), enable_gqa=gqa).transpose(1, 2)
    got = decode_attention_triton(q, k, v, lens, config=cfg).float()
    row["rel_err_vs_fp32"] = ((got - err_ref).norm() / err_ref.norm()).item()
    return row


def sweep_decode():
    results = []
    for cache_len, kv_heads in ((256 * 1024, 8), (32 * 1024, 8), (256 * 1024, 32)):
        q, caches = decode_inputs(cache_len, 32, kv_heads, 1)
        k, v = caches[0]
        lens = torch.tensor([cache_len], dtype=torch.int32, device="cuda")
        for cfg in DECODE_SWEEP:
            ms = try_graph_ms([lambda cfg=cfg: decode_attention_triton(q, k, v, lens, config=cfg)])
            gbs = None if ms is None else 2 * cache_len * kv_heads * 128 * 2 / ms / 1e6
            results.append((cache_len, kv_heads, cfg, gbs))
            log(f"  decode T={cache_len} Hkv={kv_heads} {cfg}: {gbs}")
        del q, caches, k, v
    return results


def llm_like_cache(cache_len, q_heads=32, kv_heads=8, d=128, batch=4):
    """Scores shaped like a Llama layer's (about [-12, 12], std ~2.5): a few outlier channels,
    a direction shared by the queries, and an attention-sink first key along it (~ +10)."""
    channel = torch.ones(d, device="cuda")
    channel[torch.randperm(d, device="cuda")[:4]] = 3.0
    shared = torch.randn(d, device="cuda")
    q = torch.randn(batch, 1, q_heads, d, device="cuda") * channel * 1.6 + 0.5 * shared
    k = torch.randn(batch, cache_len, kv_heads, d, device="cuda") * channel * 0.8
    k[:, 0] = 1.8 * shared
    v = torch.randn(batch, cache_len, kv_heads, d, device="cuda")
    return q.bfloat16(), k.bfloat16(), v.bfloat16()


def fallback_rates(cache_len=32768, layers=8):
    """Share of (sequence, KV head, split) programs whose exact fallback ran, over `layers` draws."""
    stats = {"score_min": 0.0, "score_max": 0.0, "max_minus_sink": 0.0}
    fired = {"sink": 0, "zero": 0, "phi=-60": 0}
    total = 0
    for _ in range(layers):
        q, k, v = llm_like_cache(cache_len)
        batch = q.shape[0]
        lens = torch.randint(cache_len // 2, cache_len + 1, (batch,), device="cuda", dtype=torch.int32)
        scores = torch.einsum("bqhd,bkhd->bhk", q.float()[:, :, ::4], k.float()) / math.sqrt(128)
        stats["score_min"] = min(stats["score_min"], scores.min().item())
        stats["score_max"] = max(stats["score_max"], scores.max().item())
        gap = (scores.amax(-1) - scores[..., 0]).max().item()
        stats["max_minus_sink"] = max(stats["max_minus_sink"], gap)
        flags = torch.zeros(batch * 8 * 128, dtype=torch.int32, device="cuda")
        for name, phi in [("sink", None), ("zero", torch.zeros(32, device="cuda")),
                          ("phi=-60", torch.full((32,), -60.0, device="cuda"))]:
            flags.zero_()
            decode_attention_triton(q, k, v, lens, unified_max=phi, num_splits=64, fallback_out=flags)
            fired[name] += int(flags.sum().item())
        total += batch * 8 * 64
    stats.update({f"fallback_{name}": count / total for name, count in fired.items()})
    # What a fallback costs: every split re-reads its keys on the exact path.
    everywhere = torch.full((32,), -1000.0, device="cuda")
    stats["us_sink"] = 1e3 * graph_ms([lambda: decode_attention_triton(q, k, v, lens, num_splits=64)])
    stats["us_all_fallback"] = 1e3 * graph_ms(
        [lambda: decode_attention_triton(q, k, v, lens, num_splits=64, unified_max=everywhere)])
    return stats


def eager_profile(out_dir):
    """Where the host time of an eager decode call goes (the graph-replayed step has none)."""
    import cProfile
    import io
    import pstats

    q, caches = decode_inputs(4096, 32, 8, 1)
    lens = torch.tensor([4096], dtype=torch.int32, device="cuda")
    call = lambda: decode_attention_triton(q, caches[0][0], caches[0][1], lens)  # noqa: E731
    call()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(200):
        call()
    host_us = (time.perf_counter() - t0) / 200 * 1e6
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(200):
        call()
    profile.disable()
    torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(12)
    if out_dir:
        with open(os.path.join(out_dir, "decode_profile.txt"), "w") as f:
            f.write(text.getvalue())
    log(text.getvalue()[:3000])
    return host_us
