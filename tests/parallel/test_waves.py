"""Two-wave prefill (facli.parallel.waves) on CPU: two tensor-parallel ranks as threads over an
in-memory stand-in for the copy-engine exchange, against the one-process model's layers."""

import pytest
import torch

from facli.models.checkpoint import CheckpointReader
from facli.models.config import ModelConfig
from facli.models.llama import CausalLM
from facli.offload.device_cache import DeviceKVCache
from facli.parallel import waves
from facli.parallel.context import ParallelContext, TensorParallelSettings
from thread_ranks import FakeExchange, _Link, _run_ranks, serial_pair_sum  # noqa: F401 - a fixture

CHUNKS = ((0, 24), (24, 41))  # the second chunk is odd and attends to the first one's keys
SETTINGS = TensorParallelSettings(tile_tokens=4, reduce_engine="copy", waves=True)


@pytest.fixture(scope="module", params=[dict(num_attention_heads=8, num_key_value_heads=4), {}],
                ids=["gqa", "mha"])
def checkpoint(request, tmp_path_factory):
    from checkpoints import build_checkpoint

    directory = tmp_path_factory.mktemp("waves")
    build_checkpoint(directory, "llama", **request.param)
    return directory


def _layers_output(model: CausalLM, x: torch.Tensor, kv, start: int, exchange=None):
    cos, sin = model.rotary.cos_sin(start, x.shape[1], model.dtype)
    if exchange is not None:
        return waves.run_layers(model.layers, x, cos, sin, kv, start, model.parallel, exchange)
    for index, layer in enumerate(model.layers):
        x = layer(x, cos, sin, kv, index, start)
    return x


def _model_and_cache(directory, parallel: ParallelContext):
    config = ModelConfig.from_dir(directory)
    model = CausalLM(config, dtype=torch.float32, device="cpu", parallel=parallel)
    model.load(CheckpointReader(directory))
    kv = DeviceKVCache(config.num_hidden_layers, 1, CHUNKS[-1][1],
                       config.num_key_value_heads // parallel.world_size, config.head_dim, torch.float32,
                       torch.device("cpu"))
    return model, kv


def test_two_waves_on_two_ranks_match_one_process(checkpoint, serial_pair_sum):
    one, one_kv = _model_and_cache(checkpoint, ParallelContext())
    ids = torch.randint(0, one.config.vocab_size, (1, CHUNKS[-1][1]), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        inputs = [one.embed_tokens(ids[:, start:stop]) for start, stop in CHUNKS]
        expected = [_layers_output(one, x, one_kv, start) for x, (start, _) in zip(inputs, CHUNKS)]
    link = _Link(CHUNKS[0][1], one.config.hidden_size, inboxes=waves.INBOXES, dtype=torch.float32)

    def rank_work(rank):
        model, kv = _model_and_cache(checkpoint, ParallelContext(rank=rank, world_size=2, settings=SETTINGS))
        exchange = FakeExchange(link, rank)
        with torch.inference_mode():
            outs = [_layers_output(model, x, kv, start, exchange) for x, (start, _) in zip(inputs, CHUNKS)]
        return outs, exchange.pushes

    (outs0, pushes0), (outs1, pushes1) = _run_ranks(rank_work)
    layers = one.config.num_hidden_layers
    for out0, out1, reference in zip(outs0, outs1, expected):
        assert torch.equal(out0, out1)  # both ranks add the partials in rank order
        torch.testing.assert_close(out0, reference, rtol=1e-5, atol=1e-5)
    # Per chunk and layer, each half's o_proj and down_proj partial crosses once each way.
    assert sorted(pushes0) == sorted(pushes1) == [(p, 0) for p in range(1, 4 * layers * len(CHUNKS) + 1)]


def test_waves_need_two_ranks_the_setting_a_whole_cache_and_two_tiles():
    x = torch.zeros(1, 64, 32)
    kv = DeviceKVCache(1, 1, 64, 2, 16, torch.float32, torch.device("cpu"))
    two = ParallelContext(rank=0, world_size=2, settings=SETTINGS)
    assert waves.applies(two, x, kv)
    assert waves.exchange_for(two, x) is None  # CPU tensors: an all_reduce per half
    assert not waves.applies(ParallelContext(settings=SETTINGS), x, kv)  # one rank
    assert not waves.applies(ParallelContext(rank=0, world_size=2), x, kv)  # setting off
    assert not waves.applies(two, x[:, :7], kv)  # 7 tokens: one tile of 4
    assert not waves.applies(two, x, object())  # a cache that is not all on the device
    rows = DeviceKVCache(1, 64, 64, 2, 16, torch.float32, torch.device("cpu"))
    assert not waves.applies(two, torch.zeros(64, 1, 32), rows)  # a decode step of 64 rows
