"""Tensor parallelism on real GPUs (NCCL, CUDA-graph decode): the same tokens as one GPU."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import requires_cuda

pytestmark = [requires_cuda, pytest.mark.slow, pytest.mark.skipif(
    torch.cuda.is_available() and torch.cuda.device_count() < 2, reason="needs 2 GPUs")]


def _generate(devices: int, tmp_path, *extra) -> dict:
    env = {**os.environ, "FACLI_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1",
           "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
    result = subprocess.run(
        [sys.executable, "-P", "-m", "facli.cli", "generate", "--prompt", "tensor parallel " * 40,
         "--max-new-tokens", "48", "--device", "cuda", "--devices", str(devices), "--json", *extra], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_two_gpus_generate_the_same_tokens_as_one(tmp_path):
    one, two = _generate(1, tmp_path, "--dtype", "fp32"), _generate(2, tmp_path, "--dtype", "fp32")
    assert two["devices"] == 2
    assert two["token_ids"] == one["token_ids"]


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.device_count() < 4, reason="needs 4 GPUs")
def test_four_gpus_generate_the_same_tokens_as_one(tmp_path):
    one, four = _generate(1, tmp_path, "--dtype", "fp32"), _generate(4, tmp_path, "--dtype", "fp32")
    assert four["devices"] == 4
    assert four["token_ids"] == one["token_ids"]
    graphed, eager = _generate(4, tmp_path, "--dtype", "bf16"), _generate(4, tmp_path, "--dtype", "bf16", "--eager")
    assert graphed["token_ids"] == eager["token_ids"]


def test_graphed_tensor_parallel_decode_equals_eager(tmp_path):
    graphed = _generate(2, tmp_path, "--dtype", "bf16")
    eager = _generate(2, tmp_path, "--dtype", "bf16", "--eager")
    assert graphed["token_ids"] == eager["token_ids"]


def _copy_engine_sums(parallel):
    """Row-parallel products summed by NCCL and by the copy engines, both ways: relayed (the
    whole output at once) and summed tile by tile by pair_sum (as the tile-by-tile layer tail
    reads them)."""
    from facli.parallel import comm, copy_engine
    from facli.parallel.context import TensorParallelSettings

    device = torch.device("cuda", parallel.local_rank)
    generator = torch.Generator(device=device).manual_seed(100 + parallel.rank)
    results = []
    # 8, 3 (one relayed tile) and 2 (none) tiles with ragged ends, both inboxes in turn, a
    # shorter output after a longer one, and each shape twice.
    for tokens, dtype in ((4096, torch.float32), (1500, torch.float32), (777, torch.bfloat16),
                          (3000, torch.bfloat16)) * 2:
        x = torch.randn(tokens, 1024, device=device, dtype=dtype, generator=generator)
        w = torch.randn(2048, 1024, device=device, dtype=dtype, generator=generator)

        def settings(engine, relay=True):
            return parallel.with_settings(TensorParallelSettings(tile_tokens=512, reduce_engine=engine,
                                                            relay_sums=relay))

        bounds = comm.tile_bounds(tokens, settings("copy"))
        by_tile = comm.pending_rows(tokens, 2048, x, settings("copy"), bounds)
        for index, (start, stop) in enumerate(bounds):  # as the tile-by-tile layer tail does
            by_tile.compute(index, x[start:stop], w)
        sums = {"nccl": comm.row_parallel_linear(x, w, settings("nccl")),
                "relay_by_tile": by_tile.wait_all().clone(),
                "relay": comm.row_parallel_linear(x, w, settings("copy")).clone(),
                "pair_sum": comm.start_row_parallel(x, w, settings("copy", relay=False), bounds).wait_all()}
        for way in ("relay", "relay_by_tile", "pair_sum"):
            ranks = [torch.empty_like(sums[way]) for _ in range(parallel.world_size)]
            torch.distributed.all_gather(ranks, sums[way])
            results.append(dict(
                way=way, dtype=str(dtype), scale=sums["nccl"].float().abs().max().item(),
                equal_to_nccl=torch.equal(sums[way], sums["nccl"]),
                max_diff=(sums[way].float() - sums["nccl"].float()).abs().max().item(),
                ranks_agree=all(torch.equal(ranks[0], other) for other in ranks[1:])))
    return results, len(copy_engine._EXCHANGES)


def test_copy_engine_sums_match_nccl():
    from facli.parallel.launch import launch

    results, exchanges = launch(_copy_engine_sums, world_size=2, device_type="cuda")
    assert exchanges == 2  # float32 and bfloat16 tiles: the copy engines did the work
    for result in results:
        assert result["ranks_agree"], result
        if result["dtype"] == "torch.float32" and result["way"] == "pair_sum":
            assert result["equal_to_nccl"], result  # a + b, rounded once either way
        elif result["dtype"] == "torch.float32":
            # The relay's GEMM adds a into its float32 accumulator, maybe in another kernel
            # (another summation order) than the plain GEMM: a few float32 roundings apart.
            assert result["max_diff"] <= 16 * 2 ** -23 * result["scale"], result
        else:
            assert result["max_diff"] <= 2 ** -7 * result["scale"], result  # one bf16 rounding


def _small_model(parallel, dtype, seed: int, tokens: int):
    """A 2-layer GQA model with random weights on this rank's GPU, and a prompt of `tokens` ids."""
    from facli.models.config import ModelConfig
    from facli.models.llama import CausalLM

    config = ModelConfig(model_type="llama", vocab_size=1024, hidden_size=1024, intermediate_size=2816,
                         num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4,
                         max_position_embeddings=4096, rms_norm_eps=1e-6)
    device = torch.device("cuda", parallel.local_rank)
    model = CausalLM(config, dtype=dtype, device=device, parallel=parallel)
    generator = torch.Generator(device=device).manual_seed(seed + parallel.rank)
    for name, param in model.named_parameters():
        param.data.normal_(1.0 if name.endswith("norm.weight") else 0.0, 0.05, generator=generator)
    ids = torch.randint(0, config.vocab_size, (1, tokens), device=device,
                        generator=torch.Generator(device=device).manual_seed(seed // 2))
    return model, ids


def _layers_by_engine(parallel):
    """All-position logits of a small bf16 model for each reduce engine, with the layer tail run
    whole or tile by tile (facli.parallel.overlap)."""
    from facli.offload.device_cache import DeviceKVCache
    from facli.parallel.context import TensorParallelSettings

    model, ids = _small_model(parallel, torch.bfloat16, seed=7, tokens=2000)
    device = ids.device
    logits = {}
    for overlap in (False, True):
        for engine, relay in (("nccl", True), ("copy", True), ("copy", False)):
            local = parallel.with_settings(TensorParallelSettings(tile_tokens=512, overlap_mlp=overlap,
                                                             reduce_engine=engine, relay_sums=relay))
            for module in model.modules():
                if hasattr(module, "parallel"):
                    module.parallel = local
            kv = DeviceKVCache(2, 1, 2048, 2, 128, torch.bfloat16, device)
            name = engine if engine == "nccl" else ("relay" if relay else "pair_sum")
            logits[(overlap, name)] = model(ids, 0, kv, all_logits=True)
    local = parallel.with_settings(TensorParallelSettings(tile_tokens=512, reduce_engine="copy", waves=True))
    for module in model.modules():
        if hasattr(module, "parallel"):
            module.parallel = local
    waves = model(ids, 0, DeviceKVCache(2, 1, 2048, 2, 128, torch.bfloat16, device), all_logits=True)
    results = {}
    for overlap in (False, True):
        relayed, reference = logits[(overlap, "relay")], logits[(overlap, "nccl")]
        ranks = [torch.empty_like(relayed) for _ in range(parallel.world_size)]
        torch.distributed.all_gather(ranks, relayed)
        results[f"overlap={overlap}"] = dict(
            pair_sum_equal=torch.equal(logits[(overlap, "pair_sum")], reference),
            relay_ranks_agree=all(torch.equal(ranks[0], other) for other in ranks[1:]),
            relay_max_diff=(relayed - reference).abs().max().item(),
            nccl_scale=reference.abs().max().item(),
            relay_argmax_agree=(relayed.argmax(-1) == reference.argmax(-1)).float().mean().item())
    from facli.parallel import copy_engine

    reference = logits[(False, "nccl")]
    ranks = [torch.empty_like(waves) for _ in range(parallel.world_size)]
    torch.distributed.all_gather(ranks, waves)
    results["waves"] = dict(
        exchange_made=any(key[-1] == 4 for key in copy_engine._EXCHANGES),
        ranks_agree=all(torch.equal(ranks[0], other) for other in ranks[1:]),
        max_diff=(waves - reference).abs().max().item(), nccl_scale=reference.abs().max().item(),
        argmax_agree=(waves.argmax(-1) == reference.argmax(-1)).float().mean().item())
    return results


def test_copy_engine_layers_match_nccl_layers():
    """With the layer tail run whole or tile by tile: copy-engine sums by pair_sum (fused with
    the residual adds and norms) give the very bits of the NCCL path with the same tiles; the
    relayed sums (rounded once where NCCL rounds twice) stay within bf16 rounding of it, the
    same on both ranks."""
    from facli.parallel.launch import launch

    results = launch(_layers_by_engine, world_size=2, device_type="cuda")  # rank 0's
    waves = results.pop("waves")
    # Two waves: the halves' GEMMs may pick other cuBLAS kernels than the whole chunk's.
    assert waves["exchange_made"] and waves["ranks_agree"], waves
    assert waves["max_diff"] <= 2 ** -5 * waves["nccl_scale"] and waves["argmax_agree"] >= 0.99, waves
    for result in results.values():
        assert result["pair_sum_equal"] and result["relay_ranks_agree"], results
        assert result["relay_max_diff"] <= 2 ** -5 * result["nccl_scale"], results
        assert result["relay_argmax_agree"] >= 0.99, results


def _waves_against_one_pass(parallel):
    """All-position logits of a small float32 model prefilled in two waves (each half's sum an
    asynchronous NCCL all_reduce) and in one pass with one all_reduce per projection. Float32,
    so that a half read before its sum lands shows, not NCCL's bf16 roundings in another order."""
    from facli.offload.device_cache import DeviceKVCache
    from facli.parallel.context import TensorParallelSettings

    model, ids = _small_model(parallel, torch.float32, seed=11, tokens=2001)
    kv_heads = model.config.num_key_value_heads // parallel.world_size
    logits = {}
    for name, settings in (("one_pass", TensorParallelSettings()),
                           ("waves", TensorParallelSettings(tile_tokens=512, waves=True))):
        for module in model.modules():
            if hasattr(module, "parallel"):
                module.parallel = parallel.with_settings(settings)
        kv = DeviceKVCache(2, 1, 2048, kv_heads, 128, torch.float32, ids.device)
        logits[name] = model(ids, 0, kv, all_logits=True)
    waves, reference = logits["waves"], logits["one_pass"]
    ranks = [torch.empty_like(waves) for _ in range(parallel.world_size)]
    torch.distributed.all_gather(ranks, waves)
    return dict(ranks_agree=all(torch.equal(ranks[0], other) for other in ranks[1:]),
                max_diff=(waves - reference).abs().max().item(), scale=reference.abs().max().item(),
                argmax_agree=(waves.argmax(-1) == reference.argmax(-1)).float().mean().item())


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.device_count() < 4, reason="needs 4 GPUs")
def test_nccl_waves_match_one_pass_on_four_gpus():
    """Four ranks sum with NCCL; in two waves the halves' GEMMs and all_reduces may add in
    another order than the whole chunk's, so the logits agree to float32 rounding, the same on
    every rank."""
    from facli.parallel.launch import launch

    result = launch(_waves_against_one_pass, world_size=4, device_type="cuda")  # rank 0's
    assert result["ranks_agree"], result
    assert result["max_diff"] <= 1e-4 * result["scale"] and result["argmax_agree"] >= 0.999, result
