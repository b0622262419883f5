"""CPU decode attention bandwidth (the KV store's "cpu" decode mode), on this machine's CPU.

Usage: python benchmarks/cpu_attention.py [--keys 32768] [--heads 32] [--kv-heads 32]
       [--calls 3] [--threads N]
One bf16 query per head over `keys` cached positions; GB/s counts the cache's K and V bytes
read once. Compares the path a bf16 cache takes (PyTorch's CPU flash-attention kernel reading
the rows in place) with the float32-tile path, on the same bf16 cache and on an fp8 cache
(e4m3 with a float32 scale per token and head, the scales not counted), the path an fp8 cache
takes (tiles converted into a reused workspace).
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import print_environment  # noqa: E402

from facli.offload import cpu_attention  # noqa: E402
from facli.offload.fp8 import FP8  # noqa: E402


def gbps(k, v, calls: int, attend) -> float:
    attend()
    began = time.perf_counter()
    for _ in range(calls):
        attend()
    return calls * (k.numel() * k.element_size() + v.numel() * v.element_size()) / (
        time.perf_counter() - began) / 1e9


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--keys", type=int, default=32768)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=32)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print_environment()
    generator = torch.Generator().manual_seed(0)
    shape = (1, args.keys, args.kv_heads, args.head_dim)
    k = torch.randn(shape, generator=generator).bfloat16()
    v = torch.randn(shape, generator=generator).bfloat16()
    q = torch.randn(1, 1, args.heads, args.head_dim, generator=generator).bfloat16()
    length, workspace = args.keys, cpu_attention.TileWorkspace()
    flash = gbps(k, v, args.calls, lambda: cpu_attention.cpu_decode_attention(q, k, v, length))
    tiled = gbps(k, v, args.calls, lambda: cpu_attention._tiled_attention(
        q, k, v, length, 0, None, None, None, cpu_attention.KEY_TILE, workspace))
    k8, v8 = k.to(FP8), v.to(FP8)
    scales = torch.rand(shape[:3], generator=generator) + 0.5
    fp8 = gbps(k8, v8, args.calls, lambda: cpu_attention.cpu_decode_attention(
        q, k8, v8, length, k_scales=scales, v_scales=scales, workspace=workspace))
    print(f"\n{torch.get_num_threads()} threads, {args.keys} keys, {args.heads}/{args.kv_heads} "
          f"heads, D {args.head_dim}, bf16 cache")
    print(f"{'path':36}{'GB/s':>8}")
    print(f"{'flash kernel, bf16 rows in place':36}{flash:>8.2f}")
    print(f"{'float32 tiles, reused workspace':36}{tiled:>8.2f}")
    print(f"{'fp8 cache, float32 tiles':36}{fp8:>8.2f}")


if __name__ == "__main__":
    main()
