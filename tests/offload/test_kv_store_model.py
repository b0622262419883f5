"""End to end: greedy generation with host-resident KV gives the all-GPU tokens (on the CPU).

A small random Llama (4 layers, GQA 4) written with transformers' save_pretrained runs through
facli's model and engine with a DeviceKVCache and with OffloadedKVStore in both decode modes,
as a plan for a small device budget would place it: some or all layers on the host.
"""

import pytest
import torch
from checkpoints import load_llama
from conftest import requires_cuda

from facli.offload.device_cache import DeviceKVCache
from facli.offload.kv_store import OffloadedKVStore
from facli.run.engine import Engine
from facli.run.sampling import Sampler, SamplingParams

CAPACITY, PROMPT, CHUNK, NEW = 160, 61, 16, 16


def _small_llama(directory, dtype, device):
    return load_llama(directory, dtype, device, num_hidden_layers=4, num_attention_heads=8,
                      num_key_value_heads=2, hidden_size=128)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return _small_llama(tmp_path_factory.mktemp("llama-gqa4"), torch.float32, "cpu")


def _generate(model, store, prompt):
    engine = Engine(model, store, prefill_chunk=CHUNK)
    run = engine.generate(prompt, max_new_tokens=NEW,
                          sampler=Sampler(SamplingParams(), torch.device("cpu")))
    return run.token_ids


def _shape(model):
    config = model.config
    return (config.num_hidden_layers, 1, CAPACITY, config.num_key_value_heads, config.head_dim,
            torch.float32, torch.device("cpu"))


@pytest.fixture(scope="module")
def expected(model):
    """Two prompts and their all-GPU (DeviceKVCache) greedy tokens."""
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, model.config.vocab_size, (n,), generator=generator).tolist()
               for n in (PROMPT, PROMPT - 20)]
    return [(p, _generate(model, DeviceKVCache(*_shape(model)), p)) for p in prompts]


@pytest.mark.parametrize("pack", [False, True], ids=["unpacked", "packed"])
@pytest.mark.parametrize("mode", ["prefetch", "cpu", "split"])
@pytest.mark.parametrize("host", [(3,), (0, 2), (0, 1, 2, 3)], ids=["one", "two", "all"])
@pytest.mark.slow
def test_same_greedy_tokens_as_all_gpu(model, expected, mode, host, pack):
    """Packed, four host layers share the slots at 75 rows each: the first prompt unpacks the
    store during its decode steps (61 + 16 positions), the second stays packed."""
    layers, batch, _, *rest = _shape(model)
    store = OffloadedKVStore(layers, batch, CAPACITY - 10, *rest, host_layers=frozenset(host),
                             decode_mode=mode, pack_slots=pack)
    # The second prompt reuses the store: reset must leave nothing behind.
    for prompt, want in expected:
        assert _generate(model, store, prompt) == want


@pytest.mark.parametrize("mode", ["prefetch", "cpu", "split"])
def test_fp8_logits_close_to_float32(model, mode):
    """fp8 KV is lossy, so greedy tokens may part ways where two candidates are close; the
    logits after a chunked prefill plus decode steps stay within 3e-2 relative (measured about
    1e-2 on this model over several prompts)."""
    prompt = torch.randint(0, model.config.vocab_size, (1, PROMPT))
    store = OffloadedKVStore(*_shape(model), host_layers=frozenset({1, 3}), decode_mode=mode,
                             kv_dtype="fp8", pack_slots=False)
    for kv in (DeviceKVCache(*_shape(model)), store):
        engine = Engine(model, kv, prefill_chunk=CHUNK)
        logits = [engine.prefill(prompt)]
        for step in range(3):
            logits.append(engine.decode_step(prompt[:, step], PROMPT + step))
        if kv is store:
            got = torch.stack(logits)
        else:
            want = torch.stack(logits)
    assert ((got - want).norm() / want.norm()).item() < 3e-2


@pytest.fixture(scope="module")
def gpu_model(tmp_path_factory):
    return _small_llama(tmp_path_factory.mktemp("llama-gqa4-bf16"), torch.bfloat16, "cuda")


@requires_cuda
@pytest.mark.parametrize("kv_dtype, host, mode, pack", [
    ("fp8", (), "prefetch", False),
    (None, (0, 2), "prefetch", False),
    (None, (1,), "split", False),
    (None, (3,), "cpu", False),
    ("fp8", (1, 2), "split", False),
    (None, (0, 1, 3), "split", True),
])
def test_decode_replays_cuda_graphs_with_the_eager_tokens(gpu_model, kv_dtype, host, mode, pack):
    """The engine captures a decode step (all of it with an all-GPU fp8 store whose e4m3 rows
    the decode kernel reads) but the host layers' KV store, which runs eagerly between the
    graphs: the replays give the tokens and logits of eager steps."""
    if kv_dtype == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("the decode kernel reads fp8 from sm89 on")
    config = gpu_model.config
    shape = (config.num_hidden_layers, 1, CAPACITY, config.num_key_value_heads, config.head_dim,
             torch.bfloat16, torch.device("cuda"))
    prompt = torch.randint(0, config.vocab_size, (PROMPT,)).tolist()
    runs = []
    for graphs in (True, False):
        store = OffloadedKVStore(*shape, host_layers=frozenset(host), decode_mode=mode,
                                 kv_dtype=kv_dtype, pack_slots=pack)
        engine = Engine(gpu_model, store, prefill_chunk=CHUNK, use_graphs=graphs)
        assert (engine._graphed_step is not None) == graphs
        sampler = Sampler(SamplingParams(), torch.device("cuda"))
        runs.append(engine.generate(prompt, max_new_tokens=NEW, sampler=sampler).token_ids)
        logits = engine.decode_step(torch.tensor([runs[-1][-1]], device="cuda"), PROMPT + NEW - 1)
        runs.append(logits.float().cpu())
        if graphs:
            segments = engine._graphed_step.segments
            assert [segment.before for segment in segments[:-1]] == list(host)
    assert runs[0] == runs[2] and len(runs[0]) == NEW
    torch.testing.assert_close(runs[1], runs[3], rtol=1e-2, atol=1e-2)
