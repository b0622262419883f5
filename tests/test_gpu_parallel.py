"""Tensor parallelism on real GPUs (NCCL, CUDA-graph decode): the same tokens as one GPU."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import requires_cuda

pytestmark = [requires_cuda, pytest.mark.skipif(
    torch.cuda.is_available() and torch.cuda.device_count() < 2, reason="needs 2 GPUs")]


def _generate(devices: int, tmp_path, *extra) -> dict:
    env = {**os.environ, "FACLI_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1",
           "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "facli.cli", "generate", "--prompt", "tensor parallel " * 40,
         "--max-new-tokens", "48", "--device", "cuda", "--devices", str(devices), "--json", *extra], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_two_gpus_generate_the_same_tokens_as_one(tmp_path):
    one, two = _generate(1, tmp_path, "--dtype", "fp32"), _generate(2, tmp_path, "--dtype", "fp32")
    assert two["devices"] == 2
    assert two["token_ids"] == one["token_ids"]


def test_graphed_tensor_parallel_decode_equals_eager(tmp_path):
    graphed = _generate(2, tmp_path, "--dtype", "bf16")
    eager = _generate(2, tmp_path, "--dtype", "bf16", "--eager")
    assert graphed["token_ids"] == eager["token_ids"]


def _copy_engine_sums(ctx):
    """Row-parallel products summed by the copy engines and by NCCL, on each rank."""
    from facli.parallel import comm, copy_engine
    from facli.parallel.context import TensorParallelSettings

    device = torch.device("cuda", ctx.local_rank)
    generator = torch.Generator(device=device).manual_seed(100 + ctx.rank)
    results = []
    # Ragged last tiles, both inboxes used in turn, and a shorter output after a longer one.
    for tokens, dtype in ((4096, torch.float32), (1500, torch.float32), (777, torch.bfloat16),
                          (3000, torch.bfloat16)):
        x = torch.randn(tokens, 1024, device=device, dtype=dtype, generator=generator)
        w = torch.randn(2048, 1024, device=device, dtype=dtype, generator=generator)
        sums = {engine: comm.row_parallel_linear(x, w, ctx.with_settings(
            TensorParallelSettings(tile_tokens=512, reduce_engine=engine))) for engine in ("copy", "nccl")}
        ranks = [torch.empty_like(sums["copy"]) for _ in range(ctx.world_size)]
        torch.distributed.all_gather(ranks, sums["copy"])
        results.append(dict(
            dtype=str(dtype), equal_to_nccl=torch.equal(sums["copy"], sums["nccl"]),
            max_diff=(sums["copy"].float() - sums["nccl"].float()).abs().max().item(),
            ranks_agree=all(torch.equal(ranks[0], other) for other in ranks[1:])))
    return results, len(copy_engine._EXCHANGES)


def test_copy_engine_sums_match_nccl():
    from facli.parallel.launch import launch

    results, exchanges = launch(_copy_engine_sums, world_size=2, device_type="cuda")
    assert exchanges == 2  # float32 and bfloat16 tiles: the copy engines did the work
    for result in results:
        assert result["ranks_agree"], result
        if result["dtype"] == "torch.float32":  # a + b, rounded once either way
            assert result["equal_to_nccl"], result
        else:
            assert result["max_diff"] <= 2 ** -6 * 40, result  # a bf16 rounding of sums near 40


def _layers_by_engine(ctx):
    """All-position logits of a small bf16 model for each reduce engine, with the layer tail run
    whole or tile by tile (facli.parallel.overlap)."""
    from facli.config import ModelConfig
    from facli.kv_cache import DeviceKVCache
    from facli.model import CausalLM
    from facli.parallel.context import TensorParallelSettings

    config = ModelConfig(model_type="llama", vocab_size=1024, hidden_size=1024, intermediate_size=2816,
                         num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4,
                         max_position_embeddings=4096, rms_norm_eps=1e-6)
    device = torch.device("cuda", ctx.local_rank)
    model = CausalLM(config, dtype=torch.bfloat16, device=device, ctx=ctx)
    generator = torch.Generator(device=device).manual_seed(7 + ctx.rank)
    for name, param in model.named_parameters():
        param.data.normal_(1.0 if name.endswith("norm.weight") else 0.0, 0.05, generator=generator)
    ids = torch.randint(0, config.vocab_size, (1, 2000), device=device,
                        generator=torch.Generator(device=device).manual_seed(3))
    logits = {}
    for overlap in (False, True):
        for engine in ("nccl", "copy"):
            local = ctx.with_settings(TensorParallelSettings(tile_tokens=512, overlap_mlp=overlap,
                                                             reduce_engine=engine))
            for module in model.modules():
                if hasattr(module, "ctx"):
                    module.ctx = local
            kv = DeviceKVCache(2, 1, 2048, 2, 128, torch.bfloat16, device)
            logits[(overlap, engine)] = model(ids, 0, kv, all_logits=True)
    return {f"overlap={overlap}": torch.equal(logits[(overlap, "copy")], logits[(overlap, "nccl")])
            for overlap in (False, True)}


def test_copy_engine_layers_equal_nccl_layers():
    """The sums, residual adds and norms the copy-engine path fuses give the very bits of the
    NCCL path with the same tiles, with and without the tile-by-tile layer tail."""
    from facli.parallel.launch import launch

    result = launch(_layers_by_engine, world_size=2, device_type="cuda")  # rank 0's
    assert all(result.values()), result
