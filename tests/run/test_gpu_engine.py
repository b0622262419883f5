"""The model on a GPU: Triton attention and CUDA-graph decode against transformers and eager."""

import pytest
import torch

from checkpoints import build_checkpoint
from conftest import requires_cuda
from facli.models.checkpoint import CheckpointReader
from facli.models.config import ModelConfig
from facli.models.llama import CausalLM
from facli.offload.device_cache import DeviceKVCache
from facli.run.engine import Engine
from facli.run.sampling import Sampler, SamplingParams

pytestmark = requires_cuda


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("gpu")
    reference = build_checkpoint(directory, "llama", num_attention_heads=8, num_key_value_heads=2,
                                 hidden_size=512, intermediate_size=1024, num_hidden_layers=3)
    return directory, reference


def _engine(directory, dtype, use_graphs, capacity=1024, chunk=200):
    config = ModelConfig.from_dir(directory)
    model = CausalLM(config, dtype=dtype, device=torch.device("cuda"))
    model.load(CheckpointReader(directory))
    cache = DeviceKVCache(config.num_hidden_layers, 1, capacity, config.num_key_value_heads,
                          config.head_dim, dtype, torch.device("cuda"))
    return Engine(model, cache, prefill_chunk=chunk, use_graphs=use_graphs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_prefill_logits_close_to_transformers(checkpoint, dtype):
    directory, reference = checkpoint
    ids = torch.randint(0, 384, (1, 517))
    with torch.no_grad():
        expected = reference.double()(ids).logits[:, -1]
    actual = _engine(directory, dtype, use_graphs=False).prefill(ids.cuda()).double().cpu()
    assert ((actual - expected).norm() / expected.norm()).item() < 3e-2


def test_graphed_decode_equals_eager(checkpoint):
    directory, _ = checkpoint
    prompt = torch.randint(0, 384, (300,)).tolist()
    runs = []
    for use_graphs in (False, True):
        engine = _engine(directory, torch.bfloat16, use_graphs)
        sampler = Sampler(SamplingParams(), torch.device("cuda"))
        runs.append(engine.generate(prompt, max_new_tokens=40, sampler=sampler).token_ids)
    assert runs[0] == runs[1]
