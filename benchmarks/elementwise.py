"""The decoder layer's fused elementwise kernels against the PyTorch code they replace.

    python benchmarks/elementwise.py [--tokens 32768] [--out DIR]

Llama-7B shapes at TP=1: RMSNorm over hidden 4096 (alone and with the residual add), rotary
embeddings on q [T, 32, 128], SiLU(gate) * up over [T, 11008]; bf16. GB/s counts each kernel's
compulsory traffic (inputs read once, outputs written once) for both, so the ratio is the time
ratio. Times are medians of CUDA-event-timed calls after a warm-up (gpu_timing); a table is printed last.
"""

import argparse
import json
import os
import torch

from common import print_environment
from facli.kernels import elementwise, elementwise_triton
from gpu_timing import median_ms


def cases(tokens):
    bf16 = dict(dtype=torch.bfloat16, device="cuda")
    x, r = torch.randn(tokens, 4096, **bf16), torch.randn(tokens, 4096, **bf16)
    w = torch.randn(4096, **bf16)
    q = torch.randn(1, tokens, 32, 128, **bf16)
    angles = torch.randn(tokens, 64, device="cuda")
    cos = torch.cat((angles, angles), -1).cos().bfloat16()
    sin = torch.cat((angles, angles), -1).sin().bfloat16()
    gate, up = torch.randn(tokens, 11008, **bf16), torch.randn(tokens, 11008, **bf16)
    size = lambda *ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    return [
        ("rms_norm", size(x, x), lambda: elementwise_triton.rms_norm_triton(x, w, 1e-5),
         lambda: elementwise.rms_norm_reference(x, w, 1e-5)),
        ("add + rms_norm", size(x, r, x, x), lambda: elementwise_triton.rms_norm_triton(x, w, 1e-5, r),
         lambda: elementwise.rms_norm_reference(x, w, 1e-5, r)),
        ("rotary (q)", size(q, q), lambda: elementwise_triton.apply_rotary_triton(q, cos, sin),
         lambda: elementwise.apply_rotary_reference(q, cos, sin)),
        ("silu(gate) * up", size(gate, up, up), lambda: elementwise_triton.silu_mul_triton(gate, up),
         lambda: elementwise.silu_mul_reference(gate, up)),
    ]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    env = print_environment()
    rows = []
    for name, traffic, fused, unfused in cases(args.tokens):
        fused_ms, unfused_ms = median_ms(fused), median_ms(unfused)
        rows.append(dict(kernel=name, tokens=args.tokens, fused_ms=fused_ms, pytorch_ms=unfused_ms,
                         fused_gbs=traffic / fused_ms / 1e6, pytorch_gbs=traffic / unfused_ms / 1e6))
        print(json.dumps(rows[-1]), flush=True)
    if args.out:
        with open(os.path.join(args.out, "elementwise.json"), "w") as f:
            json.dump({"env": env, "rows": rows}, f, indent=1)
    print(f"\n{env['gpu']}, {args.tokens} tokens, bf16, commit {env['commit']}")
    print("| kernel | fused ms (GB/s) | PyTorch ms (GB/s) | speedup |")
    print("| --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['kernel']} | {r['fused_ms']:.3f} ({r['fused_gbs']:.0f}) | {r['pytorch_ms']:.3f} "
              f"({r['pytorch_gbs']:.0f}) | {r['pytorch_ms'] / r['fused_ms']:.1f}x |")


if __name__ == "__main__":
    main()
