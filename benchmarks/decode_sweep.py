"""Decode block sizes and split counts against SDPA, per call in CUDA graphs of 8 calls.

    python benchmarks/decode_sweep.py [--fp8] [--out DIR]

For each cache shape (B=1, Tq=1, Hq=32, D=128, bf16; 32K and 256K keys, 8 and 32 KV heads): the
fastest SDPA backend, facli's own choice (`decode_config` and `choose_num_splits`), and a grid of
(block config, programs per SM) pairs whose split count fills one wave: one or two programs per
multiprocessor. Caches rotate over >= 1 GiB so they come from HBM. SDPA is timed before and after
facli's rows, so drift within the run shows. --fp8 sweeps e4m3 caches with per-token scales (as
the fp8 KV store holds them; SDPA and facli's default on bf16 caches of the same shape are the
baselines), with FP8_GRID and split counts of one or two programs per multiprocessor.
"""

import argparse
import json
import os

import torch
from torch.nn.attention import SDPBackend

from attention import environment
from attention_decode import decode_inputs, hbm_copies, sdpa_fns
from facli.kernels.configs import DecodeConfig, decode_config, num_sms
from facli.kernels.decode import choose_num_splits, decode_attention_triton
from facli.offload import fp8
from gpu_timing import log, sequence_graph_ms

SHAPES = [(32 * 1024, 8), (32 * 1024, 32), (256 * 1024, 8), (256 * 1024, 32)]
# (block_n, num_warps, num_stages, programs per SM): 64-key tiles with 2 programs per SM were
# the Hopper default before this sweep.
GRID = [(64, 4, 3, 1), (64, 4, 4, 1), (128, 4, 3, 1), (128, 8, 3, 1), (128, 8, 4, 1),
        (64, 4, 3, 2), (32, 4, 4, 2), (32, 4, 5, 2)]
FP8_GRID = [(128, 8, 3, 1), (64, 4, 3, 1), (64, 4, 3, 2), (128, 4, 2, 2), (64, 4, 2, 3),
            (64, 4, 2, 4)]


def sdpa_us(q, caches):
    """Per-call time of the faster of SDPA's default dispatch and its cuDNN backend."""
    return min(1e3 * sequence_graph_ms(sdpa_fns(q, caches, backend))
               for backend in (None, SDPBackend.CUDNN_ATTENTION))


def facli_us(q, caches, lens, cfg=None, splits=None):
    """caches: (k, v) pairs, or (k, v, k_scales, v_scales) for fp8."""
    fns = [lambda c=c: decode_attention_triton(q, c[0], c[1], lens, config=cfg, num_splits=splits,
                                               k_scales=c[2] if len(c) > 2 else None,
                                               v_scales=c[3] if len(c) > 2 else None)
           for c in caches]
    return 1e3 * sequence_graph_ms(fns)


def quantized(k, v):
    (k8, k_scales), (v8, v_scales) = fp8.quantize(k), fp8.quantize(v)
    return k8, v8, k_scales, v_scales


def default_row(q, caches, lens, cache_len, kv_heads, *, use_fp8):
    cfg = decode_config(q.device, 128, fp8=use_fp8)
    return {"config": str(cfg), "us": facli_us(q, caches, lens),
            "splits": choose_num_splits(1, kv_heads, cache_len, q.device, cfg)}


def sweep_shape(cache_len, kv_heads, grid, use_fp8):
    q, bf16_caches = decode_inputs(cache_len, 32, kv_heads, hbm_copies(cache_len, kv_heads))
    lens = torch.tensor([cache_len], dtype=torch.int32, device="cuda")
    device = q.device
    row = {"T": cache_len, "Hkv": kv_heads, "gib": 2 * cache_len * kv_heads * 128 * 2 / 2**30}
    row["sdpa_before_us"] = sdpa_us(q, bf16_caches)
    row["default"] = default_row(q, bf16_caches, lens, cache_len, kv_heads, use_fp8=False)
    caches = bf16_caches
    if use_fp8:
        caches = [quantized(k, v) for k, v in bf16_caches]
        row["fp8_default"] = default_row(q, caches, lens, cache_len, kv_heads, use_fp8=True)
    row["grid"] = []
    for block_n, warps, stages, per_sm in grid:
        cfg = DecodeConfig(block_n, warps, stages, per_sm)
        splits = max(1, per_sm * num_sms(device) // kv_heads)
        try:
            us = facli_us(q, caches, lens, cfg, splits)
        except Exception as exc:  # a config that does not fit shows as '-'
            log(f"  {cfg}: {type(exc).__name__}: {str(exc).splitlines()[0][:100]}")
            torch.cuda.synchronize()
            us = None
        row["grid"].append({"config": [block_n, warps, stages, per_sm], "splits": splits, "us": us})
        log(f"T={cache_len} Hkv={kv_heads} {cfg} splits {splits}: {us} us")
    row["sdpa_after_us"] = sdpa_us(q, bf16_caches)
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commit", default=os.environ.get("FACLI_COMMIT"))
    parser.add_argument("--fp8", action="store_true", help="sweep e4m3 caches with scales")
    parser.add_argument("--out", default=None, help="folder for decode_sweep[_fp8].json")
    args = parser.parse_args()
    grid = FP8_GRID if args.fp8 else GRID
    res = {"env": environment(args.commit), "fp8": args.fp8, "grid": grid, "rows": []}
    for cache_len, kv_heads in SHAPES:
        res["rows"].append(sweep_shape(cache_len, kv_heads, grid, args.fp8))
        torch.cuda.empty_cache()
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        name = "decode_sweep_fp8.json" if args.fp8 else "decode_sweep.json"
        with open(os.path.join(args.out, name), "w") as f:
            json.dump(res, f, indent=1)
    env = res["env"]
    print(f"{env['gpu']} | CUDA {env['cuda']} | torch {env['torch']} | triton {env['triton']} | "
          f"commit {env['commit']}")
    cache = "e4m3 caches (bf16 for SDPA and facli bf16)" if args.fp8 else "bf16 caches"
    print(f"decode us per call in graphs of 8, {cache} (block_n/warps/stages/programs per SM: "
          "splits)")
    shapes = [f"{r['T'] // 1024}K/{r['Hkv']}" for r in res["rows"]]
    print("| config | " + " | ".join(shapes) + " |")
    print("| --- |" + " --- |" * len(shapes))
    fmt = lambda us: "-" if us is None else f"{us:.1f}"  # noqa: E731
    print("| SDPA best (before / after) | " + " | ".join(
        f"{r['sdpa_before_us']:.1f} / {r['sdpa_after_us']:.1f}" for r in res["rows"]) + " |")
    for key, name in (("default", "facli default, bf16"), ("fp8_default", "facli default, fp8")):
        if key in res["rows"][0]:
            print(f"| {name} | " + " | ".join(
                f"{r[key]['us']:.1f} ({r[key]['splits']})" for r in res["rows"]) + " |")
    for i, (block_n, warps, stages, per_sm) in enumerate(grid):
        cells = [f"{fmt(r['grid'][i]['us'])} ({r['grid'][i]['splits']})" for r in res["rows"]]
        print(f"| {block_n}/{warps}/{stages}/{per_sm} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
