"""FastAttention benchmark: causal prefill TFLOP/s and decode GB/s against PyTorch SDPA.

    python benchmarks/attention.py [--sizes 4k,16k,64k,128k,256k] [--sweep] [--out DIR]

Prefill FLOPs count the causal half of the score and value products: 2 * 2 * B * Hq * T^2 * D / 2
(the convention of FlashAttention's papers). Decode GB/s counts the K and V bytes of the valid
cache read once. Every number comes from this run: ceilings, baselines and facli's kernels.
Compilation and warm-up are left out; each time is the median of timed repetitions.
"""

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from facli.bench import git_commit
from facli.kernels.configs import DecodeConfig, PrefillConfig, decode_config, prefill_config
from facli.kernels.decode import decode_attention_triton
from facli.kernels.prefill import prefill_attention_triton

SDPA_BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                 "efficient": SDPBackend.EFFICIENT_ATTENTION}
PREFILL_SWEEP = [PrefillConfig(128, 128, 8, 3, tma=True),
                 PrefillConfig(128, 128, 8, 3, tma=True, warp_specialize=True),
                 PrefillConfig(256, 64, 8, 3, tma=True),
                 PrefillConfig(128, 64, 8, 4, tma=True)]
DECODE_SWEEP = [DecodeConfig(64, 4, 3, 2), DecodeConfig(64, 4, 3, 1), DecodeConfig(32, 4, 3, 2)]


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def median_ms(fn, budget_s=0.5, max_reps=50):
    """Median of event-timed calls after one warm-up (compilation) and one estimate."""
    fn()
    torch.cuda.synchronize()
    times = []
    reps = None
    while reps is None or len(times) < reps:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
        if reps is None:
            reps = max(2, min(max_reps, int(budget_s * 1e3 / max(times[0], 1e-3))))
    times.sort()
    return times[len(times) // 2]


def graph_ms(fns, reps=200):
    """Median replay time of CUDA graphs, one per input set, replayed in turn."""
    for fn in fns:
        fn()  # compile and warm up outside the capture
    torch.cuda.synchronize()
    graphs = []
    for fn in fns:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        graphs.append(graph)
    for graph in graphs:
        graph.replay()
    torch.cuda.synchronize()
    times = []
    for i in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graphs[i % len(graphs)].replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def try_graph_ms(fns):
    try:
        return graph_ms(fns)
    except Exception as exc:
        log(f"  skipped: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
        torch.cuda.synchronize()
        return None


def try_ms(fn, **kw):
    try:
        return median_ms(fn, **kw)
    except Exception as exc:  # a backend that rejects the shape shows as '-'
        log(f"  skipped: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
        torch.cuda.empty_cache()
        return None


def environment(commit):
    props = torch.cuda.get_device_properties(0)
    commit = commit or git_commit()["commit"]
    return {"gpu": props.name, "sms": props.multi_processor_count, "cuda": torch.version.cuda,
            "torch": torch.__version__, "triton": triton.__version__, "commit": commit,
            "cudnn": torch.backends.cudnn.version()}


def ceilings():
    x = torch.empty(1 << 30, dtype=torch.bfloat16, device="cuda").normal_()
    y = torch.empty_like(x)
    copy = median_ms(lambda: y.copy_(x))
    read = median_ms(lambda: x.sum(dtype=torch.float32))
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm = median_ms(lambda: a @ a)
    del x, y
    return {"copy_rw_tbs": 2 * 2**31 / copy / 1e9, "read_tbs": 2**31 / read / 1e9,
            "matmul_tflops": 2 * 8192**3 / mm / 1e9}


def prefill_inputs(seq, q_heads, kv_heads, d=128):
    q = torch.randn(1, seq, q_heads, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, seq, kv_heads, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, seq, kv_heads, d, device="cuda", dtype=torch.bfloat16)
    return q, k, v


def naive(q, k, v):
    scores = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).triu_(1)
    return torch.softmax(scores.masked_fill_(mask, float("-inf")), dim=-1) @ v


def sweep_prefill(shapes=((16384, 32), (65536, 8))):
    """(config, geometric-mean TFLOP/s over the shapes, or None where a shape failed)."""
    rates = {cfg: [] for cfg in PREFILL_SWEEP}
    for seq, kv_heads in shapes:
        q, k, v = prefill_inputs(seq, 32, kv_heads)
        flops = 2 * 2 * 32 * seq * seq * 128 / 2
        for cfg in PREFILL_SWEEP:
            ms = try_ms(lambda: prefill_attention_triton(q, k, v, causal=True, config=cfg),
                        budget_s=0.3)
            rates[cfg].append(None if ms is None else flops / ms / 1e9)
            log(f"  prefill T={seq} Hkv={kv_heads} {cfg}: {rates[cfg][-1]}")
        del q, k, v
    return [(cfg, None if None in r else math.prod(r) ** (1 / len(r))) for cfg, r in rates.items()]


def check_prefill(seq, q_heads, kv_heads, cfg):
    q, k, v = prefill_inputs(seq, q_heads, kv_heads)
    out = prefill_attention_triton(q, k, v, causal=True, config=cfg)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        ref = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=True, enable_gqa=True).transpose(1, 2)
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def prefill_row(seq, q_heads, kv_heads, cfg):
    q, k, v = prefill_inputs(seq, q_heads, kv_heads)
    flops = 2 * 2 * q_heads * seq * seq * 128 / 2
    budget = 0.4 if seq <= 16384 else 0.05
    row = {"T": seq, "Hq": q_heads, "Hkv": kv_heads}
    row["facli"] = try_ms(lambda: prefill_attention_triton(q, k, v, causal=True, config=cfg), budget_s=budget)
    qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    del q, k, v
    for name, backend in SDPA_BACKENDS.items():
        if name == "efficient" and seq > 65536:
            row[name] = None  # minutes per call at 128K+; its curve is flat by 64K
            continue
        with sdpa_kernel([backend]):
            row[name] = try_ms(lambda: F.scaled_dot_product_attention(
                qt, kt, vt, is_causal=True, enable_gqa=kv_heads != q_heads), budget_s=budget)
    if seq <= 16384 and kv_heads == q_heads:
        row["naive"] = try_ms(lambda: naive(qt, kt, vt), budget_s=budget)
    for key in ("facli", *SDPA_BACKENDS, "naive"):
        if row.get(key) is not None:
            row[key + "_tflops"] = flops / row[key] / 1e9
    return row


def prefill_peak_memory(seq, cfg):
    q, k, v = prefill_inputs(seq, 32, 32)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out, lse = prefill_attention_triton(q, k, v, causal=True, return_lse=True, config=cfg)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before - out.numel() * out.element_size()
    return {"T": seq, "extra_bytes": extra, "lse_bytes": lse.numel() * 4}


def decode_inputs(cache_len, q_heads, kv_heads, copies):
    q = torch.randn(1, 1, q_heads, 128, device="cuda", dtype=torch.bfloat16)
    caches = [(torch.randn(1, cache_len, kv_heads, 128, device="cuda", dtype=torch.bfloat16),
               torch.randn(1, cache_len, kv_heads, 128, device="cuda", dtype=torch.bfloat16))
              for _ in range(copies)]
    return q, caches


def rotating(fns):
    state = {"i": 0}

    def call():
        fns[state["i"] % len(fns)]()
        state["i"] += 1
    return call


def decode_row(cache_len, q_heads, kv_heads, cfg):
    """Decode step times as CUDA-graph replays (how the model runs decode), and eager."""
    copies = max(1, (1 << 30) // (cache_len * kv_heads * 512))  # >= 1 GiB: beyond L2
    q, caches = decode_inputs(cache_len, q_heads, kv_heads, copies)
    lens = torch.tensor([cache_len], dtype=torch.int32, device="cuda")
    kv_bytes = 2 * cache_len * kv_heads * 128 * 2
    gqa = kv_heads != q_heads
    row = {"T": cache_len, "Hq": q_heads, "Hkv": kv_heads}
    facli = [lambda k=k, v=v: decode_attention_triton(q, k, v, lens, config=cfg) for k, v in caches]
    row["facli"] = try_graph_ms(facli)
    row["facli_eager"] = try_ms(rotating(facli))
    qt = q.transpose(1, 2)
    kts = [(k.transpose(1, 2), v.transpose(1, 2)) for k, v in caches]
    for name, backend in [("sdpa", None), *SDPA_BACKENDS.items()]:
        def run(k, v, backend=backend):
            if backend is None:
                return F.scaled_dot_product_attention(qt, k, v, enable_gqa=gqa)
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(qt, k, v, enable_gqa=gqa)
        fns = [lambda k=k, v=v, run=run: run(k, v) for k, v in kts]
        try:
            fns[0]()
        except Exception as exc:
            log(f"  {name} skipped: {str(exc).splitlines()[0][:100]}")
            row[name] = None
            continue
        row[name] = try_graph_ms(fns)
        if name == "sdpa":
            row["sdpa_eager"] = try_ms(rotating(fns))
    for key in ("facli", "sdpa", *SDPA_BACKENDS):
        if row.get(key) is not None:
            row[key + "_gbs"] = kv_bytes / row[key] / 1e6
    fast = [b for b in ("sdpa", *SDPA_BACKENDS) if row.get(b) is not None]
    row["best_sdpa_ms"] = min(row[b] for b in fast) if fast else None
    err_ref = F.scaled_dot_product_attention(qt.float(), kts[0][0].float(), kts[0][1].float(),
                                             enable_gqa=gqa).transpose(1, 2)
    got = decode_attention_triton(q, caches[0][0], caches[0][1], lens, config=cfg).float()
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


def fmt(x, digits=0):
    return "-" if x is None else f"{x:.{digits}f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="4k,16k,64k,128k,256k")
    parser.add_argument("--decode-sizes", default="32k,256k")
    parser.add_argument("--sweep", action="store_true", help="try block-size configs first")
    parser.add_argument("--commit", default=os.environ.get("FACLI_COMMIT"))
    parser.add_argument("--out", default=None, help="folder for results.json")
    args = parser.parse_args()
    sizes = [int(s[:-1]) * 1024 if s.endswith("k") else int(s) for s in args.sizes.split(",") if s]
    dsizes = [int(s[:-1]) * 1024 if s.endswith("k") else int(s) for s in args.decode_sizes.split(",")]
    device = torch.device("cuda")
    res = {"env": environment(args.commit)}
    log(res["env"])
    res["ceilings"] = ceilings()
    log(res["ceilings"])
    pcfg = prefill_config(device, 128, 1 << 14, causal=True, dtype=torch.bfloat16)
    dcfg = decode_config(device)
    if args.sweep:
        sweep = [(c, t) for c, t in sweep_prefill() if t is not None]
        pcfg = max(sweep, key=lambda ct: ct[1])[0]
        dsweep = [r for r in sweep_decode() if r[3] is not None]
        score = {}
        for cache_len, kv_heads, cfg, gbs in dsweep:  # geometric mean over the swept shapes
            score[cfg] = score.get(cfg, 0.0) + math.log(gbs)
        dcfg = max(score, key=score.get)
        res["sweep"] = {"prefill": [(str(c), t) for c, t in sweep],
                        "decode": [(t, h, str(c), g) for t, h, c, g in dsweep]}
    res["prefill_config"], res["decode_config"] = str(pcfg), str(dcfg)
    res["check"] = {f"T{t}-Hkv{h}": check_prefill(t, 32, h, pcfg) for t in (4096, 16384) for h in (32, 8)}
    log(res["check"])
    res["prefill"] = []
    for seq in sizes:
        for kv_heads in (32, 8):
            t0 = time.time()
            res["prefill"].append(prefill_row(seq, 32, kv_heads, pcfg))
            log(f"prefill T={seq} Hkv={kv_heads} ({time.time() - t0:.0f}s): {res['prefill'][-1]}")
            torch.cuda.empty_cache()
    if sizes:
        res["peak_memory"] = prefill_peak_memory(max(sizes), pcfg)
        log(res["peak_memory"])
    res["decode"] = []
    for cache_len in dsizes:
        for kv_heads in (8, 32):
            res["decode"].append(decode_row(cache_len, 32, kv_heads, dcfg))
            log(res["decode"][-1])
            torch.cuda.empty_cache()
    res["fallback"] = fallback_rates()
    log(res["fallback"])
    res["eager_host_us"] = eager_profile(args.out)
    if args.out:
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(res, f, indent=1)
    env = res["env"]
    print(f"\n{env['gpu']} | CUDA {env['cuda']} | torch {env['torch']} | triton {env['triton']} | "
          f"commit {env['commit']}")
    c = res["ceilings"]
    print(f"ceilings: copy {c['copy_rw_tbs']:.2f} TB/s (r+w), read {c['read_tbs']:.2f} TB/s, "
          f"bf16 matmul {c['matmul_tflops']:.0f} TFLOP/s")
    print(f"prefill config {pcfg}; decode config {dcfg}")
    print("\ncausal prefill, B=1, Hq=32, D=128, bf16, TFLOP/s")
    print("| T | Hkv | facli | SDPA flash | SDPA cuDNN | SDPA efficient | naive | facli/flash | facli/best |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in res["prefill"]:
        tf = {k: r.get(k + "_tflops") for k in ("facli", "flash", "cudnn", "efficient", "naive")}
        best = max([v for k, v in tf.items() if k not in ("facli", "naive") and v] or [float("nan")])
        ratio = (tf["facli"] / tf["flash"]) if tf["facli"] and tf["flash"] else None
        print(f"| {r['T'] // 1024}K | {r['Hkv']} | {fmt(tf['facli'])} | {fmt(tf['flash'])} | "
              f"{fmt(tf['cudnn'])} | {fmt(tf['efficient'])} | {fmt(tf['naive'])} | {fmt(ratio, 2)} | "
              f"{fmt(tf['facli'] / best if tf['facli'] else None, 2)} |")
    print("\ndecode, B=1, Tq=1, Hq=32, D=128, bf16, CUDA-graph replay: us (GB/s of K+V read)")
    print("| cache | Hkv | facli | SDPA default | flash | cuDNN | efficient | facli/best SDPA | "
          "eager facli / SDPA us |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in res["decode"]:
        cells = [f"{fmt(r[k] * 1e3 if r.get(k) else None)} ({fmt(r.get(k + '_gbs'))})"
                 for k in ("facli", "sdpa", *SDPA_BACKENDS)]
        speed = r["best_sdpa_ms"] / r["facli"] if r.get("facli") and r.get("best_sdpa_ms") else None
        eager = f"{fmt(r['facli_eager'] * 1e3 if r.get('facli_eager') else None)} / " \
                f"{fmt(r['sdpa_eager'] * 1e3 if r.get('sdpa_eager') else None)}"
        print(f"| {r['T'] // 1024}K | {r['Hkv']} | " + " | ".join(cells) + f" | {fmt(speed, 2)} | {eager} |")
    if "peak_memory" in res:
        peak = res["peak_memory"]
        print(f"\npeak extra memory of prefill at {peak['T']}: {peak['extra_bytes']} B "
              f"(lse {peak['lse_bytes']} B)")
    print(f"correctness vs SDPA flash: {res['check']}")
    print(f"fallback: {res['fallback']}")
    print(f"eager decode host time per call: {res['eager_host_us']:.0f} us")


if __name__ == "__main__":
    main()
