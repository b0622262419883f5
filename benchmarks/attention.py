"""FastAttention benchmark: causal prefill TFLOP/s and decode GB/s against PyTorch SDPA.

    python benchmarks/attention.py [--sizes 4k,16k,64k,128k,256k] [--sweep] [--out DIR]
                                   [--fp8 [--fp8-sizes 16k,64k,128k] [--fp8-chunk 8k]]

"facli" is what the model runs (`prefill_attention`: on Hopper the Gluon kernel); "facli Triton"
is the portable Triton kernel with the table's (or the sweep's) block sizes. --fp8 adds causal
prefill over an fp8 KV cache against both (benchmarks/attention_fp8.py says what each column is).

Prefill FLOPs count the causal half of the score and value products: 2 * 2 * B * Hq * T^2 * D / 2
(the convention of FlashAttention's papers). Decode GB/s counts the K and V bytes of the valid
cache read once. Every number comes from this run: ceilings, baselines and facli's kernels.
Compilation and warm-up are left out; each time is the median of timed repetitions.
"""

import argparse
import json
import math
import os
import time

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from attention_decode import SDPA_BACKENDS, decode_row, eager_profile, fallback_rates, sweep_decode
from attention_fp8 import fp8_prefill_row, print_fp8_table
from facli.bench.environment import git_commit
from facli.kernels.configs import PrefillConfig, decode_config, prefill_config
from facli.kernels import prefill_attention
from facli.kernels.prefill import prefill_attention_triton
from gpu_timing import log, median_ms, try_ms

PREFILL_SWEEP = [PrefillConfig(128, 128, 8, 3, tma=True),
                 PrefillConfig(128, 128, 8, 3, tma=True, warp_specialize=True),
                 PrefillConfig(256, 64, 8, 3, tma=True),
                 PrefillConfig(128, 64, 8, 4, tma=True)]


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
    """Relative L2 difference to SDPA flash of the model's path and of the Triton kernel."""
    q, k, v = prefill_inputs(seq, q_heads, kv_heads)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        ref = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=True, enable_gqa=True).transpose(1, 2).float()
    outs = {"facli": prefill_attention(q, k, v, causal=True),
            "facli_triton": prefill_attention_triton(q, k, v, causal=True, config=cfg)}
    return {name: ((out.float() - ref).norm() / ref.norm()).item() for name, out in outs.items()}


def prefill_row(seq, q_heads, kv_heads, cfg):
    q, k, v = prefill_inputs(seq, q_heads, kv_heads)
    flops = 2 * 2 * q_heads * seq * seq * 128 / 2
    budget = 0.4 if seq <= 16384 else 0.05
    row = {"T": seq, "Hq": q_heads, "Hkv": kv_heads}
    row["facli"] = try_ms(lambda: prefill_attention(q, k, v, causal=True), budget_s=budget)
    row["facli_triton"] = try_ms(lambda: prefill_attention_triton(q, k, v, causal=True, config=cfg),
                                 budget_s=budget)
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
    for key in ("facli", "facli_triton", *SDPA_BACKENDS, "naive"):
        if row.get(key) is not None:
            row[key + "_tflops"] = flops / row[key] / 1e9
    return row


def prefill_peak_memory(seq):
    q, k, v = prefill_inputs(seq, 32, 32)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out, lse = prefill_attention(q, k, v, causal=True, return_lse=True)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before - out.numel() * out.element_size()
    return {"T": seq, "extra_bytes": extra, "lse_bytes": lse.numel() * 4}


def fmt(x, digits=0):
    return "-" if x is None else f"{x:.{digits}f}"


def tokens(text):
    """'16k,64k' -> [16384, 65536]; '' -> []."""
    return [int(s[:-1]) * 1024 if s.endswith("k") else int(s) for s in text.split(",") if s]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="4k,16k,64k,128k,256k")
    parser.add_argument("--decode-sizes", default="32k,256k", help="'' skips decode")
    parser.add_argument("--sweep", action="store_true", help="try block-size configs first")
    parser.add_argument("--fp8", action="store_true",
                        help="also time prefill over an fp8 KV cache against bf16")
    parser.add_argument("--fp8-sizes", default="16k,64k,128k",
                        help="prompt lengths of the fp8 rows (Hq = Hkv = 32, D = 128)")
    parser.add_argument("--fp8-chunk", default="8k",
                        help="queries of the last-chunk fp8 rows, besides the whole prompt")
    parser.add_argument("--commit", default=os.environ.get("FACLI_COMMIT"))
    parser.add_argument("--out", default=None, help="folder for results.json")
    return parser.parse_args(argv)


def fp8_rows(sizes, chunk):
    """(keys, queries) of the fp8 rows: each whole prompt, then its last chunk if shorter."""
    rows = []
    for seq in sizes:
        rows += [(seq, seq)] + ([(seq, chunk)] if chunk < seq else [])
    return rows


def main():
    args = parse_args()
    if args.out:
        os.makedirs(args.out, exist_ok=True)
    sizes = tokens(args.sizes)
    dsizes = tokens(args.decode_sizes)
    device = torch.device("cuda")
    res = {"env": environment(args.commit)}
    log(res["env"])
    res["ceilings"] = ceilings()
    log(res["ceilings"])
    pcfg = prefill_config(device, 128, 1 << 14, causal=True, dtype=torch.bfloat16)
    dcfg = decode_config(device, 128)
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
    res["fp8_prefill"] = []
    fp8_shapes = fp8_rows(tokens(args.fp8_sizes), tokens(args.fp8_chunk)[0]) if args.fp8 else []
    for seq, queries in fp8_shapes:
        t0 = time.time()
        res["fp8_prefill"].append(fp8_prefill_row(seq, queries))
        log(f"fp8 prefill T={seq} queries={queries} ({time.time() - t0:.0f}s): "
            f"{res['fp8_prefill'][-1]}")
        torch.cuda.empty_cache()
    if sizes:
        res["peak_memory"] = prefill_peak_memory(max(sizes))
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
    print("| T | Hkv | facli | facli Triton | SDPA flash | SDPA cuDNN | SDPA efficient | naive | "
          "facli/flash | facli/best |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in res["prefill"]:
        tf = {k: r.get(k + "_tflops")
              for k in ("facli", "facli_triton", "flash", "cudnn", "efficient", "naive")}
        best = max([v for k, v in tf.items() if not k.startswith("facli") and k != "naive" and v]
                   or [float("nan")])
        ratio = (tf["facli"] / tf["flash"]) if tf["facli"] and tf["flash"] else None
        print(f"| {r['T'] // 1024}K | {r['Hkv']} | {fmt(tf['facli'])} | {fmt(tf['facli_triton'])} | "
              f"{fmt(tf['flash'])} | "
              f"{fmt(tf['cudnn'])} | {fmt(tf['efficient'])} | {fmt(tf['naive'])} | {fmt(ratio, 2)} | "
              f"{fmt(tf['facli'] / best if tf['facli'] else None, 2)} |")
    if res["fp8_prefill"]:
        print_fp8_table(res["fp8_prefill"], fmt)
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
    print("\ndecode as above, per call inside one CUDA graph of 8 calls: us (GB/s of K+V read)")
    print("| cache | Hkv | facli | SDPA default | flash | cuDNN | efficient | facli/best SDPA |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in res["decode"]:
        cells = [f"{fmt(r[k + '_seq'] * 1e3 if r.get(k + '_seq') else None)} ({fmt(r.get(k + '_seq_gbs'))})"
                 for k in ("facli", "sdpa", *SDPA_BACKENDS)]
        speed = (r["best_sdpa_seq_ms"] / r["facli_seq"]
                 if r.get("facli_seq") and r.get("best_sdpa_seq_ms") else None)
        print(f"| {r['T'] // 1024}K | {r['Hkv']} | " + " | ".join(cells) + f" | {fmt(speed, 2)} |")
    if "peak_memory" in res:
        peak = res["peak_memory"]
        print(f"\npeak extra memory of prefill at {peak['T']}: {peak['extra_bytes']} B "
              f"(lse {peak['lse_bytes']} B)")
    print(f"correctness vs SDPA flash: {res['check']}")
    print(f"fallback: {res['fallback']}")
    print(f"eager decode host time per call: {res['eager_host_us']:.0f} us")


if __name__ == "__main__":
    main()
