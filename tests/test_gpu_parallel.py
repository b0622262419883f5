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
