"""How a decode step is cut into captured runs and eager host layers (facli.graphs), on the CPU.

CUDA graphs themselves are checked on a GPU (tests/test_kv_store_model.py); here the runs a
graphed step replays are executed directly, with tensor positions in the graph layers, and
must compose to the model's own eager step.
"""

import pytest
import torch
from checkpoints import build_checkpoint

from facli.checkpoint import CheckpointReader
from facli.config import ModelConfig
from facli.graphs import GraphedDecodeStep, plan_runs
from facli.kv_cache import DeviceKVCache
from facli.model import CausalLM
from facli.offload.kv_store import OffloadedKVStore

CAPACITY, PROMPT, STEPS = 64, 23, 4


def _runs(num_layers, graph_layers):
    return [(run.graphed, run.first, run.stop) for run in plan_runs(num_layers, graph_layers)]


def test_every_layer_graphed_is_one_run():
    assert _runs(4, {0, 1, 2, 3}) == [(True, -1, 5)]


def test_host_layers_split_the_runs():
    assert _runs(6, {0, 1, 3}) == [(True, -1, 2), (False, 2, 3), (True, 3, 4), (False, 4, 6),
                                   (True, 6, 7)]
    # The embedding and the head are captured on their own around eager end layers.
    assert _runs(3, {1}) == [(True, -1, 0), (False, 0, 1), (True, 1, 2), (False, 2, 3),
                             (True, 3, 4)]
    assert _runs(2, set()) == [(True, -1, 0), (False, 0, 2), (True, 2, 3)]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama-5-layers")
    build_checkpoint(directory, "llama", num_hidden_layers=5, num_attention_heads=4,
                     num_key_value_heads=2, hidden_size=64)
    model = CausalLM(ModelConfig.from_dir(directory), dtype=torch.float32, device="cpu")
    model.load(CheckpointReader(directory))
    return model


def _store(model, host_layers):
    config = model.config
    return OffloadedKVStore(config.num_hidden_layers, 1, CAPACITY, config.num_key_value_heads,
                            config.head_dim, torch.float32, torch.device("cpu"),
                            host_layers=frozenset(host_layers), decode_mode="split")


@pytest.mark.parametrize("host", [(), (0,), (1, 3), (4,), (0, 1, 2, 3, 4)])
def test_runs_compose_to_the_model_step(model, host):
    config = model.config
    generator = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, config.vocab_size, (1, PROMPT), generator=generator)
    reference = DeviceKVCache(config.num_hidden_layers, 1, CAPACITY, config.num_key_value_heads,
                              config.head_dim, torch.float32, torch.device("cpu"))
    store = _store(model, host)
    step = GraphedDecodeStep(model, store)
    eager = [layer for run in step.runs if not run.graphed for layer in range(run.first, run.stop)]
    assert eager == list(host)
    model(prompt, 0, reference)
    model(prompt, 0, store)
    token = prompt[:, -1]
    for position in range(PROMPT, PROMPT + STEPS):
        want = model(token[:, None], position, reference)
        x = token[:, None]
        for run in step.runs:
            at = torch.tensor([position]) if run.graphed else position
            x = step._execute(run, x, at)
        torch.testing.assert_close(x, want, rtol=1e-5, atol=1e-5)
        token = want.argmax(-1)
