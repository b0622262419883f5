"""How a decode step is cut into captured segments and eager attentions of host layers
(facli.run.graphs), on the CPU.

CUDA graphs themselves are checked on a GPU (tests/offload/test_kv_store_model.py); here the segments
a graphed step replays are executed directly, with tensor positions in the graph layers and int
positions in the host layers' KV store, and must compose to the model's own eager step.
"""

import pytest
import torch
from checkpoints import build_checkpoint

from facli.models.checkpoint import CheckpointReader
from facli.models.config import ModelConfig
from facli.models.llama import CausalLM
from facli.offload.device_cache import DeviceKVCache
from facli.offload.kv_store import OffloadedKVStore
from facli.run.graphs import GraphedDecodeStep, plan_segments

CAPACITY, PROMPT, STEPS = 64, 23, 4


def _segments(num_layers, graph_layers):
    return [(s.after, (s.layers.start, s.layers.stop), s.before)
            for s in plan_segments(num_layers, graph_layers)]


def test_every_layer_graphed_is_one_segment():
    assert _segments(4, {0, 1, 2, 3}) == [(None, (0, 4), None)]


def test_host_layers_cut_the_step_at_their_attention():
    assert _segments(6, {0, 1, 3}) == [(None, (0, 2), 2), (2, (3, 4), 4), (4, (5, 5), 5),
                                       (5, (6, 6), None)]
    assert _segments(3, {1}) == [(None, (0, 0), 0), (0, (1, 2), 2), (2, (3, 3), None)]
    assert _segments(2, set()) == [(None, (0, 0), 0), (0, (1, 1), 1), (1, (2, 2), None)]


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
    assert [segment.before for segment in step.segments[:-1]] == list(host)
    model(prompt, 0, reference)
    model(prompt, 0, store)
    token = prompt[:, -1]
    for position in range(PROMPT, PROMPT + STEPS):
        want = model(token[:, None], position, reference)
        at = torch.tensor([position])
        outputs = (token[:, None],)
        for segment in step.segments:
            if segment.after is not None:  # the host layer's KV store, at an int position
                outputs = (outputs[0], step.attend(segment.after, outputs, position))
            outputs = step.execute(segment, outputs, at)
        torch.testing.assert_close(outputs[0], want, rtol=1e-5, atol=1e-5)
        token = want.argmax(-1)
