"""What a row-parallel projection costs when its tiles are only pushed to the peer, on 2 GPUs.

    torchrun --standalone --nproc-per-node 2 benchmarks/copy_engine_push.py

o_proj and down_proj shapes of Llama-7B at TP=2 (32768 tokens, tiles of 4096), ms per call:
  nocomm     the tile GEMMs alone
  push       each tile's GEMM, then on a side stream its copy into the peer's symmetric inbox
             and the peer's flag raised by cuStreamWriteValue32: no SM work besides the GEMMs
  push-only  the pushes alone (copy-engine bandwidth over NVLink)
  tiled-ce   facli's path (facli.parallel.comm, reduce engine "copy"): pushes, and the sums in a
             kernel that waits on each tile's flag
Successive calls here do not depend on each other, which the exchange relies on to reuse its
inboxes (facli.parallel.copy_engine), so the sums may read a later call's tile; the times stand.
Each rank checks that its inbox holds the peer's last pushed output and that the flags are set.
"""

import os
import time

import torch
import torch.distributed as dist

from facli.parallel import comm, copy_engine
from facli.parallel.context import ParallelContext, TensorParallelSettings

TOKENS, HIDDEN, TILE, REPS = 32768, 4096, 4096, 20


def timed_ms(step) -> float:
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    dist.barrier()
    started = time.perf_counter()
    for _ in range(REPS):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - started) / REPS * 1e3


def main() -> None:
    dist.init_process_group("nccl")
    rank = dist.get_rank()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
    torch.cuda.set_device(device)
    parallel = ParallelContext(rank=rank, world_size=2, local_rank=device.index)
    ce = parallel.with_settings(TensorParallelSettings(tile_tokens=TILE, reduce_engine="copy"))
    bounds = [(start, start + TILE) for start in range(0, TOKENS, TILE)]
    exchange = copy_engine.exchange_for(TOKENS, HIDDEN, torch.bfloat16, device)
    results = {}
    for name, width in (("o_proj", 2048), ("down_proj", 5504)):
        x = torch.randn(TOKENS, width, dtype=torch.bfloat16, device=device) * 0.1
        w = torch.randn(HIDDEN, width, dtype=torch.bfloat16, device=device) * 0.02
        out = torch.empty(TOKENS, HIDDEN, dtype=torch.bfloat16, device=device)

        def tiles(push: bool, gemm: bool = True) -> None:
            inbox, sequence = exchange.begin()
            for index, (start, stop) in enumerate(bounds):
                if gemm:
                    torch.mm(x[start:stop], w.t(), out=out[start:stop])
                if push:
                    exchange.push(out[start:stop], inbox, start, index, sequence)
            torch.cuda.current_stream().wait_stream(exchange.stream)

        steps = {"nocomm": lambda: tiles(False), "push": lambda: tiles(True),
                 "push-only": lambda: tiles(True, gemm=False),
                 "tiled-ce": lambda: comm.row_parallel_linear(x, w, ce)}
        for rep in range(2):
            for mode, step in steps.items():
                results[(name, mode, rep)] = timed_ms(step)
        inbox, sequence = exchange.begin()
        for index, (start, stop) in enumerate(bounds):
            torch.mm(x[start:stop], w.t(), out=out[start:stop])
            exchange.push(out[start:stop], inbox, start, index, sequence)
        torch.cuda.synchronize()
        dist.barrier()
        sums = [None, None]
        dist.all_gather_object(sums, out.float().sum().item())
        received = exchange.inbox[inbox].float().sum().item()
        flags = exchange.flags[inbox, :len(bounds)].to(torch.int64)
        print(f"rank {rank} {name}: inbox holds the peer's output {abs(received - sums[1 - rank]) < 1e-3},"
              f" flags set {bool((flags == sequence).all())}", flush=True)
    if rank == 0:
        print("| projection | mode | ms (two runs) |\n| --- | --- | --- |")
        for name in ("o_proj", "down_proj"):
            for mode in ("nocomm", "push", "push-only", "tiled-ce"):
                print(f"| {name} | {mode} | {results[(name, mode, 0)]:.3f} / {results[(name, mode, 1)]:.3f} |")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
