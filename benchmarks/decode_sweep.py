"""Decode block sizes and split counts against SDPA, per call in CUDA graphs of 8 calls.

    python benchmarks/decode_sweep.py [--out DIR]

For each cache shape (B=1, Tq=1, Hq=32, D=128, bf16; 32K and 256K keys, 8 and 32 KV heads): the
fastest SDPA backend, facli's own choice (`decode_config` and `choose_num_splits`), and a grid of
(block config, programs per SM) pairs whose split count fills one wave: one or two programs per
multiprocessor. Caches rotate over >= 1 GiB so they come from HBM. SDPA is timed before and after
facli's rows, so drift within the run shows.
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
from gpu_timing import log, sequence_graph_ms

SHAPES = [(32 * 1024, 8), (32 * 1024, 32), (256 * 1024, 8), (256 * 1024, 32)]
# (block_n, num_warps, num_stages, programs per SM): 64-key tiles with 2 programs per SM were
# the Hopper default before this sweep.
GRID = [(64, 4, 3, 1), (64, 4, 4, 1), (128, 4, 3, 1), (128, 8, 3, 1), (128, 8, 4, 1),
        (64, 4, 3, 2), (32, 4, 4, 2), (32, 4, 5, 2)]


def sdpa_us(q, caches):
    """Per-call time of the faster of SDPA's default dispatch and its cuDNN backend."""
    return min(1e3 * sequence_graph_ms(sdpa_fns(q, caches, backend))
               for backend in (None, SDPBackend.CUDNN_ATTENTION))


def facli_us(q, caches, lens, cfg=None, splits=None):
    fns = [lambda k=k, v=v: decode_attention_triton(q, k, v, lens, config=cfg, num_splits=splits)
           for k, v in caches]
    return 1e3 * sequence_graph_ms(fns)


def sweep_shape(cache_len, kv_heads):
    q, caches = decode_inputs(cache_len, 32, kv_heads, hbm_copies(cache_len, kv_heads))
    lens = torch.tensor([cache_len], dtype=torch.int32, device="cuda")
    device = q.device
    row = {"T": cache_len, "Hkv": kv_heads, "gib": 2 * cache_len * kv_heads * 128 * 2 / 2**30}
    row["sdpa_before_us"] = sdpa_us(q, caches)
    default = decode_config(device, 128)
    row["default"] = {"config": str(default), "us": facli_us(q, caches, lens),
                      "splits": choose_num_splits(1, kv_heads, cache_len, device, default)}
    row["grid"] = []
    for block_n, warps, stages, per_sm in GRID:
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
    row["sdpa_after_us"] = sdpa_us(q, caches)
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commit", default=os.environ.get("FACLI_COMMIT"))
    parser.add_argument("--out", default=None, help="folder for decode_sweep.json")
    args = parser.parse_args()
    res = {"env": environment(args.commit), "rows": []}
    for cache_len, kv_heads in SHAPES:
        res["rows"].append(sweep_shape(cache_len, kv_heads))
        torch.cuda.empty_cache()
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "decode_sweep.json"), "w") as f:
            json.dump(res, f, indent=1)
    env = res["env"]
    print(f"{env['gpu']} | CUDA {env['cuda']} | torch {env['torch']} | triton {env['triton']} | "
          f"commit {env['commit']}")
    print("decode us per call in graphs of 8 (block_n/warps/stages/programs per SM: splits)")
    shapes = [f"{r['T'] // 1024}K/{r['Hkv']}" for r in res["rows"]]
    print("| config | " + " | ".join(shapes) + " |")
    print("| --- |" + " --- |" * len(shapes))
    fmt = lambda us: "-" if us is None else f"{us:.1f}"  # noqa: E731
    print("| SDPA best (before / after) | " + " | ".join(
        f"{r['sdpa_before_us']:.1f} / {r['sdpa_after_us']:.1f}" for r in res["rows"]) + " |")
    print("| facli default | " + " | ".join(
        f"{r['default']['us']:.1f} ({r['default']['splits']})" for r in res["rows"]) + " |")
    for i, (block_n, warps, stages, per_sm) in enumerate(GRID):
        cells = [f"{fmt(r['grid'][i]['us'])} ({r['grid'][i]['splits']})" for r in res["rows"]]
        print(f"| {block_n}/{warps}/{stages}/{per_sm} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
