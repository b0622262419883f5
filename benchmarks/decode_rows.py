"""Decode attention over the rows of a batch: split counts against the chooser's.

With more (row, KV head) programs than one wave holds, the last wave may run part-filled (7 rows
of 32 heads: 224 programs on 132 SMs). This measures every split count from 1 to 8 against the
one `choose_num_splits` takes, the fewest that fill the waves.

    python benchmarks/decode_rows.py [--rows 5,7,13,24] [--lengths 16k,32k] [--caches bf16,fp8]
        [--fp8-config BLOCK_N,WARPS,STAGES,PER_SM] [--scales head-major] [--out DIR]

Rows of one cache as continuous batching steps them (B rows, Tq=1, Hq=Hkv=32, D=128: Llama-7B's
heads), each row full to the length, bf16 and e4m3 caches with per-token scales. For each shape,
facli's decode kernel per call in one CUDA graph of 8 calls at split counts 1..8, next to the
count `choose_num_splits` picks and, for bf16, SDPA's best backend. The GB/s column counts K and
V bytes read (scales included for fp8). A "ragged" row spreads the rows' lengths evenly from a
quarter of the length to all of it, as rows of a summarize job are. --fp8-config times e4m3
caches with that DecodeConfig instead of the GPU's own; --scales head-major stores the fp8
scales [B, Hkv, T] (one head's scales together, as a GPU KV store holds them) behind the same
[B, T, Hkv] view.
"""

import argparse
import json
import os

import torch

from attention import environment
from attention_decode import sdpa_fns
from facli.kernels.configs import DecodeConfig, decode_config
from facli.kernels.decode import choose_num_splits, decode_attention_triton
from facli.offload import fp8
from facli.units import parse_ctx
from gpu_timing import sequence_graph_ms

HEADS, HEAD_DIM = 32, 128
SPLITS = range(1, 9)


def caches(rows: int, length: int, use_fp8: bool, head_major_scales: bool = False):
    k = torch.randn(rows, length, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    if not use_fp8:
        return k, v, None, None
    (k8, ks), (v8, vs) = fp8.quantize(k), fp8.quantize(v)
    if head_major_scales:  # the same [B, T, Hkv] view of scales stored [B, Hkv, T]
        ks, vs = (s.transpose(1, 2).contiguous().transpose(1, 2) for s in (ks, vs))
    return k8, v8, ks, vs


def facli_us(q, cache, lens, splits, cfg):
    k, v, ks, vs = cache
    return 1e3 * sequence_graph_ms([lambda: decode_attention_triton(
        q, k, v, lens, num_splits=splits, k_scales=ks, v_scales=vs, config=cfg)])


def measure(rows: int, length: int, use_fp8: bool, ragged: bool,
            fp8_config: DecodeConfig | None = None, head_major_scales: bool = False) -> dict:
    q = torch.randn(rows, 1, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    cache = caches(rows, length, use_fp8, head_major_scales)
    spread = torch.linspace(length // 4, length, rows) if ragged else torch.full((rows,), length)
    lens = spread.to(torch.int32).cuda()
    read = sum(int(n) for n in lens.tolist()) * HEADS * HEAD_DIM * 2 * (1 if use_fp8 else 2)
    read += sum(int(n) for n in lens.tolist()) * HEADS * 8 if use_fp8 else 0
    cfg = (use_fp8 and fp8_config) or decode_config(q.device, HEAD_DIM, fp8=use_fp8)
    chosen = choose_num_splits(rows, HEADS, length, q.device, cfg)
    times = {splits: facli_us(q, cache, lens, splits, cfg) for splits in SPLITS}
    row = {"rows": rows, "length": length, "cache": "fp8" if use_fp8 else "bf16",
           "config": str(cfg), "head_major_scales": head_major_scales, "ragged": ragged,
           "bytes": read, "chosen": chosen,
           "us": {str(s): t for s, t in times.items()}}
    if not use_fp8 and not ragged:
        row["sdpa_us"] = 1e3 * sequence_graph_ms(sdpa_fns(q, [cache[:2]]))
    del cache
    torch.cuda.empty_cache()
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="5,7,13,24")
    parser.add_argument("--lengths", default="16k,32k")
    parser.add_argument("--caches", default="bf16,fp8")
    parser.add_argument("--fp8-config", default=None)
    parser.add_argument("--scales", choices=("token-major", "head-major"), default="token-major")
    parser.add_argument("--commit", default=os.environ.get("FACLI_COMMIT"))
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    fp8_config = None
    if args.fp8_config:
        fields = [int(x) for x in args.fp8_config.split(",")]
        fp8_config = DecodeConfig(*fields, long_split_tiles=4, least_row_splits=4)
    results = []
    for use_fp8 in (cache == "fp8" for cache in args.caches.split(",")):
        for length in map(parse_ctx, args.lengths.split(",")):
            for rows in map(int, args.rows.split(",")):
                for ragged in (False, True):
                    results.append(measure(rows, length, use_fp8, ragged, fp8_config,
                                           args.scales == "head-major"))
    env = environment(args.commit)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        name = f"decode_rows{'_fp8cfg' if fp8_config else ''}_{args.scales}.json"
        with open(os.path.join(args.out, name), "w") as f:
            json.dump({"env": env, "rows": results}, f, indent=1)
    print(f"{env['gpu']} | CUDA {env['cuda']} | torch {env['torch']} | triton {env['triton']} | "
          f"commit {env['commit']}")
    print("decode us per call in graphs of 8 (Hq=Hkv=32, D=128); chosen = choose_num_splits")
    if fp8_config:
        print(f"fp8 caches with {fp8_config}")
    print(f"fp8 scales stored {args.scales}")
    print("| cache | rows | length | lengths | " + " | ".join(f"{s} splits" for s in SPLITS)
          + " | chosen | chosen GB/s | best GB/s | 1 split GB/s | SDPA us |")
    print("| --- |" * (4 + len(SPLITS) + 5))
    for r in results:
        us = {int(s): t for s, t in r["us"].items()}
        rate = lambda t: f"{r['bytes'] / t / 1e3:.0f}"  # noqa: E731  bytes / us -> GB/s
        sdpa = f"{r['sdpa_us']:.0f}" if "sdpa_us" in r else "-"
        cells = [r["cache"], str(r["rows"]), f"{r['length'] // 1024}K",
                 "ragged" if r["ragged"] else "full", *(f"{us[s]:.0f}" for s in SPLITS),
                 str(r["chosen"]), rate(us[r["chosen"]]), rate(min(us.values())), rate(us[1]), sdpa]
        print("| " + " | ".join(cells) + " |")

if __name__ == "__main__":
    main()
