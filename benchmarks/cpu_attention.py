"""CPU decode attention bandwidth (the KV store's "cpu" decode mode), on this machine's CPU.

Usage: python benchmarks/cpu_attention.py [--keys 32768] [--heads 32] [--calls 3]
One bf16 query per head over `keys` cached positions; GB/s counts K and V read once. Compares
float32 tiles converted into fresh buffers every call against a TileWorkspace reused across
calls (what the store does).
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import print_environment  # noqa: E402

from facli.offload.cpu_attention import KEY_TILE, TileWorkspace, cpu_decode_attention  # noqa: E402


def gbps(q, k, v, calls: int, workspace_for_call) -> float:
    length = k.shape[1]
    cpu_decode_attention(q, k, v, length, workspace=workspace_for_call())
    began = time.perf_counter()
    for _ in range(calls):
        cpu_decode_attention(q, k, v, length, workspace=workspace_for_call())
    return calls * 2 * k.numel() * k.element_size() / (time.perf_counter() - began) / 1e9


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--keys", type=int, default=32768)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--calls", type=int, default=3)
    args = parser.parse_args()
    print_environment()
    generator = torch.Generator().manual_seed(0)
    shape = (1, args.keys, args.heads, args.head_dim)
    k = torch.randn(shape, generator=generator).bfloat16()
    v = torch.randn(shape, generator=generator).bfloat16()
    q = torch.randn(1, 1, args.heads, args.head_dim, generator=generator).bfloat16()
    shared = TileWorkspace()
    fresh = gbps(q, k, v, args.calls, TileWorkspace)
    reused = gbps(q, k, v, args.calls, lambda: shared)
    print(f"\n{torch.get_num_threads()} threads, {args.keys} keys, {args.heads} heads, "
          f"D {args.head_dim}, key tile {KEY_TILE}, bf16 cache")
    print(f"{'tile buffers':24}{'GB/s':>8}")
    print(f"{'fresh each call':24}{fresh:>8.2f}")
    print(f"{'reused workspace':24}{reused:>8.2f}")


if __name__ == "__main__":
    main()
