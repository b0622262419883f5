"""How fast a KV cache's layout can be read, apart from attention's arithmetic.

    python benchmarks/kv_read.py [--length 256k] [--heads 32] [--splits 8,12] [--out DIR]

Programs as the decode kernel lays them out (split, KV head), each streaming its keys in tiles of
64 keys x 128 dims, xor-folding the words it loads so that almost no arithmetic remains. Caches:
fp8 (128 bytes per key and head) and bf16 (256), token-major as facli stores them ([B, T, Hkv, D]:
one head's keys Hkv * D elements apart) and head-major ([B, Hkv, T, D]: contiguous), fp8 with
and without its per-token float32 scales ([B, T, Hkv] or [B, Hkv, T]). us per call in one CUDA
graph of 8 calls over caches rotated through >= 1 GiB; GB/s counts the bytes of K, V and scales.
"""

import argparse
import json
import os

import torch
import triton
import triton.language as tl

from attention import environment
from facli.units import parse_ctx
from gpu_timing import sequence_graph_ms

BLOCK_N = 64


@triton.jit
def _read_kernel(K, V, KS, VS, OUT, stride_t, stride_h, stride_st, stride_sh, length,
                 SCALES: tl.constexpr, BLOCK_N: tl.constexpr, WORDS: tl.constexpr):
    split = tl.program_id(0)
    head = tl.program_id(1).to(tl.int64)
    chunk = tl.cdiv(tl.cdiv(length, tl.num_programs(0)), BLOCK_N) * BLOCK_N
    start = split * chunk
    stop = tl.minimum(start + chunk, length)
    offs_n = tl.arange(0, BLOCK_N)
    offs_w = tl.arange(0, WORDS)
    acc = tl.zeros([BLOCK_N, WORDS], tl.int32)
    acc_s = tl.zeros([BLOCK_N], tl.int32)
    for n in range(start, stop, BLOCK_N):
        keys = n + offs_n
        ok = keys < stop
        offs = head * stride_h + keys.to(tl.int64)[:, None] * stride_t + offs_w[None, :]
        acc ^= tl.load(K + offs, mask=ok[:, None], other=0)
        acc ^= tl.load(V + offs, mask=ok[:, None], other=0)
        if SCALES:
            s_offs = head * stride_sh + keys.to(tl.int64) * stride_st
            acc_s ^= tl.load(KS + s_offs, mask=ok, other=0)
            acc_s ^= tl.load(VS + s_offs, mask=ok, other=0)
    folded = tl.xor_sum(tl.xor_sum(acc, 1) ^ acc_s, 0)
    tl.store(OUT + head * tl.num_programs(0) + split, folded)


def caches(length, heads, dtype, head_major, copies):
    """`copies` (k, v, k_scales, v_scales) sets viewed [T, H, words] and [T, H] (int32 words),
    stored in the given layout."""
    words = 128 * dtype.itemsize // 4
    order = (lambda t: t.transpose(0, 1)) if head_major else (lambda t: t)
    shape = (heads, length) if head_major else (length, heads)  # storage order
    out = []
    for _ in range(copies):
        k, v = (order(torch.randint(0, 2**31 - 1, shape + (words,), dtype=torch.int32,
                                    device="cuda")) for _ in range(2))
        ks, vs = (order(torch.rand(shape, device="cuda").view(torch.int32)) for _ in range(2))
        out.append((k, v, ks, vs))
    return out


def read_us(sets, length, heads, scales, splits):
    out = torch.empty(heads * splits, dtype=torch.int32, device="cuda")

    def call(k, v, ks, vs):
        _read_kernel[(splits, heads)](k, v, ks, vs, out, k.stride(0), k.stride(1), ks.stride(0),
                                      ks.stride(1), length, SCALES=scales, BLOCK_N=BLOCK_N,
                                      WORDS=k.shape[-1], num_warps=4, num_stages=3)

    return 1e3 * sequence_graph_ms([lambda s=s: call(*s) for s in sets])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", default="256k")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--splits", default="8,12")
    parser.add_argument("--commit", default=os.environ.get("FACLI_COMMIT"))
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    length, heads = parse_ctx(args.length), args.heads
    rows = []
    for name, dtype in (("fp8", torch.float8_e4m3fn), ("bf16", torch.bfloat16)):
        per_copy = 2 * length * heads * 128 * dtype.itemsize
        copies = max(1, -(-2**30 // per_copy))
        for head_major in (False, True):
            sets = caches(length, heads, dtype, head_major, copies)
            for scales in ((False, True) if name == "fp8" else (False,)):
                nbytes = 2 * length * heads * (128 * dtype.itemsize + (4 if scales else 0))
                for splits in map(int, args.splits.split(",")):
                    us = read_us(sets, length, heads, scales, splits)
                    rows.append({"cache": name, "layout": "head-major" if head_major else "token-major",
                                 "scales": scales, "splits": splits, "us": us,
                                 "gbs": nbytes / us / 1e3})
            del sets
            torch.cuda.empty_cache()
    env = environment(args.commit)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "kv_read.json"), "w") as f:
            json.dump({"env": env, "length": length, "heads": heads, "rows": rows}, f, indent=1)
    print(f"{env['gpu']} | CUDA {env['cuda']} | torch {env['torch']} | triton {env['triton']} | "
          f"commit {env['commit']}")
    print(f"KV reads at {length} keys, {heads} KV heads, D=128, one sequence")
    print("| cache | layout | scales | splits | us | GB/s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['cache']} | {r['layout']} | {'yes' if r['scales'] else 'no'} | {r['splits']} | "
              f"{r['us']:.1f} | {r['gbs']:.0f} |")


if __name__ == "__main__":
    main()
