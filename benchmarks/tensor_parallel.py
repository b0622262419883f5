"""Tensor parallelism on GPUs: TP=N vs TP=1, and tiling-AllReduce vs one AllReduce per projection.

    python benchmarks/tensor_parallel.py --devices 2 --out $OUT

A Llama-7B-shaped model with random bf16 weights built directly on the GPUs (no checkpoint).
Prefill is one forward over the whole prompt; attention is facli's (kernels/), as in `facli
generate`, and the same in every mode, so the collectives are what differs between runs.

For TP=N four collective modes run the same compute:
  nocomm     row-parallel projections skip their all_reduce (wrong numbers; the compute alone)
  nocomm+mlp nocomm with the layer tail run tile by tile (as tiled+mlp): its compute alone
  single     one all_reduce per row-parallel projection, after its GEMM
  tiled      tiling-AllReduce: per-tile all_reduce launched as each tile's GEMM ends
  tiled+mlp  tiled, and each layer's tail (o_proj, norm, MLP) runs tile by tile, so the
             attention all_reduce overlaps the MLP GEMMs (facli.parallel.overlap)
  tiled-ce, tiled+mlp-ce   the same with tiles summed by the copy engines through symmetric
             memory instead of NCCL's all_reduce (facli.parallel.copy_engine)
  tiled-ce-pairsum, tiled+mlp-ce-pairsum   the same with the copy engines' tiles summed by
             pair_sum instead of relayed
  waves      the prompt's two halves take turns through each layer, each half's all_reduce
             running beside the other half's compute (facli.parallel.waves)
  waves-ce   the same with the halves' sums pushed by the copy engines (two ranks)
  nocomm+waves   waves without the sums: its compute alone
Exposed communication = time(mode) - time(nocomm); hidden = 1 - exposed(tiled) / exposed(single).
A projection-level run (o_proj and down_proj shapes alone) gives the same fraction without the
attention in between, for several tile sizes. Timings exclude warm-up (cuBLAS plans, Triton
compilation, NCCL set-up). Results: a JSON line per measurement in OUT/tensor_parallel.jsonl, a table last.
"""

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

from facli.bench.environment import git_commit
from facli.kernels import elementwise
from facli.models.config import ModelConfig
from facli.models.llama import CausalLM
from facli.offload.device_cache import DeviceKVCache
from facli.parallel import comm, copy_engine
from facli.parallel.context import SINGLE_PROCESS, ParallelContext, TensorParallelSettings
from facli.parallel.launch import launch
from facli.units import parse_ctx

from tp_table import table

LLAMA_7B = ModelConfig(
    model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
    max_position_embeddings=262144 + 1024, rms_norm_eps=1e-6,
)
SMOKE = replace(LLAMA_7B, vocab_size=512, hidden_size=256, intermediate_size=704,
                num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=8)
MODES = {
    "nocomm": dict(tile_tokens=None),
    "nocomm+mlp": dict(overlap_mlp=True),
    "single": dict(tile_tokens=None),
    "tiled": {},
    "tiled+mlp": dict(overlap_mlp=True),
    "tiled-ce": dict(reduce_engine="copy"),
    "tiled-ce-pairsum": dict(reduce_engine="copy", relay_sums=False),
    "tiled+mlp-ce": dict(overlap_mlp=True, reduce_engine="copy"),
    "tiled+mlp-ce-pairsum": dict(overlap_mlp=True, reduce_engine="copy", relay_sums=False),
    "nocomm+waves": dict(waves=True),
    "waves": dict(waves=True),
    "waves-ce": dict(reduce_engine="copy", waves=True),
}
TILED_MODES = [mode for mode in MODES if mode.startswith(("tiled", "waves"))]
# The compute alone: every row-parallel sum is left out (UnsummedRows), so results are WRONG.
# These keep the default reduce engine (nccl), so no copy-engine exchange is built either.
NO_SUMS = ("nocomm", "nocomm+mlp", "nocomm+waves")


class UnsummedRows(comm.PendingRows):
    """comm.PendingRows as on one rank: each tile holds this rank's GEMM alone, never summed over
    the ranks. The NO_SUMS modes put it in comm's place (use_mode)."""

    def __init__(self, count, features, like, parallel, bounds, exchange=None, front_end_wait=False):
        super().__init__(count, features, like, SINGLE_PROCESS, bounds)


SUMMED_ROWS = comm.PendingRows


def kv_cache(config: ModelConfig, capacity: int, world: int, device) -> DeviceKVCache:
    return DeviceKVCache(config.num_hidden_layers, 1, capacity, config.num_key_value_heads // world,
                         config.head_dim, torch.bfloat16, device)


def build_model(config: ModelConfig, parallel: ParallelContext, device) -> CausalLM:
    model = CausalLM(config, dtype=torch.bfloat16, device=device, parallel=parallel)
    generator = torch.Generator(device=device).manual_seed(1234 + parallel.rank)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.data.fill_(1.0)
        else:
            param.data.normal_(0.0, 0.02, generator=generator)
    return model


def use_mode(parallel: ParallelContext, mode: str, tile: int | None) -> ParallelContext:
    """This rank's context with `mode`'s collective settings. A NO_SUMS mode also puts
    UnsummedRows in place of comm.PendingRows (the row-parallel outputs of comm, overlap and
    waves) in this process, until a mode with sums is used."""
    comm.PendingRows = UnsummedRows if mode in NO_SUMS else SUMMED_ROWS
    return parallel.with_settings(TensorParallelSettings(**{"tile_tokens": tile, **MODES[mode]}))


def set_mode(model: CausalLM, parallel: ParallelContext, mode: str, tile: int) -> ParallelContext:
    """Point every layer at a context with this mode's collective settings (use_mode)."""
    new = use_mode(parallel, mode, tile)
    for module in model.modules():
        if hasattr(module, "parallel"):
            module.parallel = new
    return new


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_gib(device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0


def timed(fn, parallel: ParallelContext, device) -> float:
    _sync(device)
    comm.barrier(parallel)
    started = time.perf_counter()
    fn()
    _sync(device)
    elapsed = torch.tensor([time.perf_counter() - started], device=device)
    if parallel.is_distributed:
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return elapsed.item()


def prefill_and_decode(model, kv, parallel, device, length, decode_tokens, chunk=None):
    """Seconds of a prefill of `length` tokens (in chunks of `chunk` tokens, each attending to
    the ones before, as `facli generate` runs it; default one pass), and of `decode_tokens`
    greedy steps after it."""
    ids = torch.randint(0, model.config.vocab_size, (1, length), device=device,
                        generator=torch.Generator(device=device).manual_seed(5))
    chunk = chunk or length

    def prefill():
        for start in range(0, length, chunk):
            model(ids[:, start:start + chunk], start, kv)

    prefill_s = timed(prefill, parallel, device)
    if not decode_tokens:
        return prefill_s, None
    token = comm.broadcast_tokens(model(ids[:, -1:], length - 1, kv).argmax(-1), parallel)

    def steps():
        nonlocal token
        for step in range(decode_tokens):
            token = comm.broadcast_tokens(model(token[:, None], length + step, kv).argmax(-1), parallel)

    steps()  # warm-up at this context
    return prefill_s, timed(steps, parallel, device) / decode_tokens


def decode_only(model, kv, parallel, device, length, decode_tokens):
    token = torch.zeros(1, dtype=torch.long, device=device)

    def steps():
        nonlocal token
        for step in range(decode_tokens):
            token = comm.broadcast_tokens(model(token[:, None], length + step, kv).argmax(-1), parallel)

    steps()
    return timed(steps, parallel, device) / decode_tokens


def projection_bench(config, parallel, device, tokens, tiles, reps):
    """o_proj and down_proj alone at `tokens` tokens: ms per mode and tile."""
    results = []
    h, n = config.hidden_size, parallel.world_size
    for name, width in (("o_proj", h), ("down_proj", config.intermediate_size)):
        x = torch.randn(tokens, width // n, dtype=torch.bfloat16, device=device) * 0.1
        w = torch.randn(h, width // n, dtype=torch.bfloat16, device=device) * 0.02
        out = torch.empty(tokens, h, dtype=torch.bfloat16, device=device)
        summed = torch.empty_like(out)
        runs = [("nocomm", None), ("single", None)] + [("tiled", t) for t in tiles]
        if device.type == "cuda" and copy_engine.usable(n):
            runs += [("tiled-ce", t) for t in tiles] + [("copy-engine-only", t) for t in tiles]
        runs.append(("allreduce-only", None))
        out.zero_()  # summed over and over: zeros stay finite
        for mode, tile in runs:
            if mode == "allreduce-only":
                def step():
                    comm.all_reduce_sum(out, parallel)
            elif mode == "copy-engine-only":
                def step(tile=tile):
                    exchange = copy_engine.exchange_for(tokens, h, out.dtype, device)
                    inbox, sequence = exchange.begin()
                    bounds = [(s, min(s + tile, tokens)) for s in range(0, tokens, tile)]
                    for index, (s, e) in enumerate(bounds):
                        exchange.push(out[s:e], inbox, s, index, sequence)
                    for index, (s, e) in enumerate(bounds):
                        elementwise.pair_sum(out[s:e], exchange.received(inbox, s, e), out=summed[s:e],
                                             flag=exchange.flag(inbox, index), sequence=sequence)
            else:
                local = use_mode(parallel, mode, tile)

                def step():
                    comm.row_parallel_linear(x, w, local)
            for _ in range(reps):  # a whole untimed block: the first copy-engine calls are slow
                step()
            ms = 1e3 * timed(lambda: [step() for _ in range(reps)], parallel, device) / reps
            results.append(dict(kind="projection", proj=name, tokens=tokens, mode=mode, tile=tile, ms=ms))
    return results


def tile_from_planner(config: ModelConfig, length: int, world: int) -> int | None:
    try:
        from facli.planner.hardware import detect_hardware
        from facli.planner.search import PlanOptions, plan

        chosen = plan(config, detect_hardware(), length + 64, 1,
                      PlanOptions(devices=world, prefill_chunk=length, force=True))
        return chosen.allreduce_tile_tokens
    except Exception as exc:  # noqa: BLE001 - the benchmark still runs with a fixed tile
        print(f"planner unavailable ({type(exc).__name__}: {exc}); tile 4096", file=sys.stderr)
        return None


def run_tp1(args, emit):
    device = torch.device(args.device_type, 0) if args.device_type == "cuda" else torch.device("cpu")
    model = build_model(args.config, SINGLE_PROCESS, device)
    kv = kv_cache(args.config, max(args.lengths) + args.decode_tokens + 8, 1, device)
    model(torch.zeros(1, min(args.lengths), dtype=torch.long, device=device), 0, kv)  # warm-up
    for length in args.lengths:
        for rep in range(args.reps):
            decode = args.decode_tokens if length == args.decode_at and rep == 0 else 0
            prefill_s, decode_s = prefill_and_decode(model, kv, SINGLE_PROCESS, device, length, decode, args.chunk)
            emit(dict(kind="prefill", tp=1, mode="-", tokens=length, seconds=prefill_s))
            if decode_s is not None:
                emit(dict(kind="decode", tp=1, mode="-", context=length, ms_per_token=1e3 * decode_s))
    emit(dict(kind="peak", tp=1, rank=0, gib=_peak_gib(device)))
    del model, kv
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_tp(parallel: ParallelContext, args):
    """One rank of the TP=N runs; returns the measurements (rank 0's are the ones kept)."""
    device = torch.device("cuda", parallel.local_rank) if args.device_type == "cuda" else torch.device("cpu")
    config, tile = args.config, args.tile
    if args.gemm_sm_carveout:
        # Experimental PyTorch API: cuBLASLt GEMMs leave this many SMs free for NCCL's kernels.
        torch.backends.cuda.preferred_blas_library("cublaslt")
        torch._C._set_sm_carveout_experimental(args.gemm_sm_carveout)
    records = projection_bench(config, parallel, device, args.projection_tokens, args.projection_tiles, 20)
    emit = records.append
    model = build_model(config, parallel, device)
    kv = kv_cache(config, max(args.lengths) + args.decode_tokens + 8, parallel.world_size, device)
    for mode in args.modes:
        set_mode(model, parallel, mode, tile)
        model(torch.zeros(1, min(args.lengths), dtype=torch.long, device=device), 0, kv)
    for length in args.lengths:
        for rep in range(args.reps + (2 if length <= 32768 else 0)):  # short runs: more repeats
            for mode in args.modes:
                local = set_mode(model, parallel, mode, tile)
                prefill_s, _ = prefill_and_decode(model, kv, local, device, length, 0, args.chunk)
                emit(dict(kind="prefill", tp=parallel.world_size, mode=mode, tokens=length,
                          seconds=prefill_s))
        if length == args.decode_at:
            for mode in args.modes:
                local = set_mode(model, parallel, mode, tile)
                ms = 1e3 * decode_only(model, kv, local, device, length, args.decode_tokens)
                emit(dict(kind="decode", tp=parallel.world_size, mode=mode, context=length, ms_per_token=ms))
    emit(dict(kind="peak", tp=parallel.world_size, rank=parallel.rank, gib=_peak_gib(device)))
    del kv
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if args.long:
        records += run_long(model, parallel, device, args, tile)
    return records


def run_long(model, parallel, device, args, tile):
    """The whole long prompt on the N GPUs: prefill, then decode at that context."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    kv = kv_cache(args.config, args.long + args.decode_tokens + 8, parallel.world_size, device)
    local = set_mode(model, parallel, "tiled", tile)
    prefill_s, decode_s = prefill_and_decode(model, kv, local, device, args.long, args.decode_tokens)
    peak = _peak_gib(device)
    tp = parallel.world_size
    return [dict(kind="prefill", tp=tp, mode="tiled", tokens=args.long, seconds=prefill_s),
            dict(kind="decode", tp=tp, mode="tiled", context=args.long, ms_per_token=1e3 * decode_s),
            dict(kind="peak-long", tp=tp, rank=parallel.rank, gib=peak)]


def generate_check(devices: int, device_type: str) -> dict:
    """The embedded demo model through `facli generate`'s path: N ranks vs 1, greedy, float32."""
    from facli.generation import plan_and_generate
    from facli.run_options import RunOptions
    from facli.run.sampling import SamplingParams

    text = "The quick brown fox jumps over the lazy dog. " * 8
    try:
        one, many = (plan_and_generate(RunOptions(device=device_type, dtype="fp32", devices=n,
                                                  ctx=4096),
                                       text, SamplingParams(), 24, stream=False)
                     for n in (1, devices))
    except Exception as exc:  # noqa: BLE001 - report it and keep the measurements
        return dict(kind="generate-check", ok=False, error=f"{type(exc).__name__}: {exc}")
    return dict(kind="generate-check", ok=one["token_ids"] == many["token_ids"], devices=devices,
                tokens=many["token_ids"], ttft_s_1=one["ttft_s"], ttft_s_n=many["ttft_s"])


def environment(device_type: str) -> dict:
    import triton

    gpu = torch.cuda.get_device_name(0) if device_type == "cuda" else "cpu (smoke run)"
    nccl = ".".join(map(str, torch.cuda.nccl.version())) if device_type == "cuda" else "-"
    return dict(kind="environment", gpu=gpu, gpus=torch.cuda.device_count(), cuda=torch.version.cuda,
                torch=torch.__version__, triton=triton.__version__, nccl=nccl,
                commit=git_commit()["commit"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--lengths", default="32k,128k", help="prefill lengths, TP=1 and TP=N")
    parser.add_argument("--decode-at", default="128k", help="decode after the prefill of this length; 0 skips")
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--long", default="256k", help="TP=N only prefill+decode length; 0 skips")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--chunk", type=parse_ctx, default=None,
                        help="prefill in chunks of this many tokens (as facli generate); default one pass")
    parser.add_argument("--tile", type=int, default=None, help="AllReduce tile tokens (default: planner)")
    parser.add_argument("--projection-tokens", type=int, default=32768)
    parser.add_argument("--projection-tiles", default="1024,2048,4096,8192")
    parser.add_argument("--skip-tp1", action="store_true")
    parser.add_argument("--modes", default=",".join(MODES), help="TP=N collective modes to run")
    parser.add_argument("--high-priority-comm", action="store_true",
                        help="NCCL collectives on a high-priority stream")
    parser.add_argument("--gemm-sm-carveout", type=int, default=0,
                        help="SMs cuBLASLt GEMMs leave free (experimental PyTorch API)")
    parser.add_argument("--generate-check", action="store_true",
                        help="also run the demo model through facli's runtime on N ranks vs 1")
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU with gloo: checks the script")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".out")))
    args = parser.parse_args()
    args.lengths = [parse_ctx(v) for v in args.lengths.split(",")]
    args.decode_at = parse_ctx(args.decode_at) if args.decode_at != "0" else 0
    args.long = parse_ctx(args.long) if args.long not in ("0", "") else 0
    args.projection_tiles = [int(v) for v in args.projection_tiles.split(",")]
    args.modes = args.modes.split(",")
    unknown = set(args.modes) - set(MODES)
    if unknown:
        parser.error(f"unknown --modes {sorted(unknown)}; choose from {', '.join(MODES)}")
    args.config = SMOKE if args.smoke else LLAMA_7B
    args.device_type = "cpu" if args.smoke else "cuda"
    args.out.mkdir(parents=True, exist_ok=True)
    records = []
    log = (args.out / "tensor_parallel.jsonl").open("w")

    def emit(record):
        records.append(record)
        log.write(json.dumps(record) + "\n")
        log.flush()
        print(json.dumps(record), flush=True)

    emit(environment(args.device_type))
    if not args.skip_tp1:
        run_tp1(args, emit)
    args.tile = args.tile or tile_from_planner(args.config, max(args.lengths), args.devices) or 4096
    emit(dict(kind="setting", tile_tokens=args.tile))
    emit(dict(kind="setting", high_priority_comm=args.high_priority_comm,
              gemm_sm_carveout=args.gemm_sm_carveout,
              cuda_device_max_connections=os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS")))
    for record in launch(run_tp, (args,), world_size=args.devices, device_type=args.device_type,
                         high_priority_comm=args.high_priority_comm):
        emit(record)
    summary = table(records, args.devices, list(MODES), TILED_MODES)
    (args.out / "tensor_parallel_table.md").write_text(summary + "\n")
    if args.generate_check:
        emit(generate_check(args.devices, args.device_type))
    print(summary, flush=True)


if __name__ == "__main__":
    main()
