"""Prompts decoded together in the rows of one KV cache (facli.run.batching) against the same
prompts run one at a time: the same tokens, greedy and sampled, whatever the row a prompt
lands in, the order rows free up, or how many rows there are."""

import pytest
import torch
from checkpoints import load_llama

from conftest import requires_cuda
from facli.errors import FacliError
from facli.models.config import ModelConfig
from facli.models.rope import RotaryEmbedding
from facli.offload.device_cache import DeviceKVCache
from facli.offload.kv_store import OffloadedKVStore
from facli.run.batching import BatchedEngine, RowRequest
from facli.run.engine import Engine
from facli.run.sampling import Sampler, SamplingParams

CAPACITY = 48
PROMPT_LENGTHS = (5, 17, 9, 30, 3, 12, 21, 44)
NEW_TOKENS = (6, 3, 10, 4, 8, 1, 5, 20)  # the last is cut by the row's capacity


def _model(directory, dtype, device):
    return load_llama(directory, dtype, device, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, hidden_size=64)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return _model(tmp_path_factory.mktemp("llama-3-layers"), torch.float32, "cpu")


def _cache(model, batch, store="device"):
    """The all-device cache in the model's dtype, or ("fp8") the fp8 store with every layer on
    the device."""
    config = model.config
    shape = (config.num_hidden_layers, batch, CAPACITY, config.num_key_value_heads,
             config.head_dim, model.dtype, model.device)
    if store == "fp8":
        return OffloadedKVStore(*shape, kv_dtype="fp8")
    return DeviceKVCache(*shape)


def _requests(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [RowRequest(torch.randint(3, model.config.vocab_size, (length,), generator=generator).tolist(),
                       new, key=index)
            for index, (length, new) in enumerate(zip(PROMPT_LENGTHS, NEW_TOKENS))]


def _one_at_a_time(model, requests, sampling, eos_ids=(), store="device"):
    runs = {}
    for request in requests:
        engine = Engine(model, _cache(model, 1, store), prefill_chunk=8)
        runs[request.key] = engine.generate(request.prompt_ids, max_new_tokens=request.max_new_tokens,
                                            sampler=Sampler(sampling, model.device), eos_ids=eos_ids)
    return runs


def _together(model, requests, sampling, rows, eos_ids=(), store="device", lookahead=0):
    """lookahead: decode steps queued before a step's tokens are read (a GPU's default is 1;
    on the CPU the queue logic runs all the same)."""
    queue, runs = list(requests), {}
    engine = BatchedEngine(model, _cache(model, rows, store), prefill_chunk=8)
    engine.engine.lookahead = lookahead
    stats = engine.run(lambda: queue.pop(0) if queue else None,
                       lambda request, run: runs.setdefault(request.key, run),
                       sampling=sampling, eos_ids=eos_ids)
    return runs, stats


@pytest.mark.parametrize("rows, store, lookahead", [
    (1, "device", 0), (3, "device", 0), (8, "device", 0), (3, "fp8", 0), (8, "fp8", 0),
    (1, "device", 1), (3, "device", 1), (3, "fp8", 2)])
@pytest.mark.parametrize("sampling", [SamplingParams(), SamplingParams(temperature=0.9, top_k=20, seed=3)],
                         ids=["greedy", "sampled"])
@pytest.mark.slow
def test_rows_give_the_tokens_of_one_at_a_time(model, rows, store, lookahead, sampling):
    requests = _requests(model)
    want = _one_at_a_time(model, requests, sampling, store=store)
    got, stats = _together(model, requests, sampling, rows, store=store, lookahead=lookahead)
    assert {key: run.token_ids for key, run in got.items()} == \
        {key: run.token_ids for key, run in want.items()}
    assert [len(got[key].token_ids) for key in sorted(got)] == [6, 3, 10, 4, 8, 1, 5, CAPACITY - 44 + 1]
    assert all(got[key].finish_reason == "length" for key in got)
    assert stats.prompts == len(requests)
    # Every token after the first comes from a decode step, counted once per busy row.
    assert stats.decode_tokens == sum(len(run.token_ids) - 1 for run in got.values())


@pytest.mark.parametrize("lookahead", [0, 1, 2])
def test_eos_frees_a_row_for_the_next_prompt(model, lookahead):
    """Queued steps past a row's EOS leave no token in its run and no trace in the prompt that
    takes the row next."""
    requests = _requests(model, seed=1)
    eos = _one_at_a_time(model, requests, SamplingParams())[2].token_ids[2]  # ends prompt 2 early
    want = _one_at_a_time(model, requests, SamplingParams(), eos_ids=(eos,))
    got, stats = _together(model, requests, SamplingParams(), 3, eos_ids=(eos,), lookahead=lookahead)
    assert got[2].finish_reason == "eos" and len(got[2].token_ids) <= 3
    assert {key: run.token_ids for key, run in got.items()} == \
        {key: run.token_ids for key, run in want.items()}
    assert {key: run.finish_reason for key, run in got.items()} == \
        {key: run.finish_reason for key, run in want.items()}
    assert stats.decode_tokens == sum(len(run.token_ids) - 1 for run in got.values())


@pytest.mark.parametrize("lookahead", [0, 1])
def test_prompts_handed_out_after_earlier_results(model, lookahead):
    """next_request may return None for now and more later, once a result it waits on is in."""
    first, second = _requests(model)[:2]
    handed, runs = [], {}

    def next_request():
        if not handed:
            handed.append(first)
            return first
        if 0 in runs and len(handed) == 1:
            handed.append(second)
            return second
        return None

    engine = BatchedEngine(model, _cache(model, 4), prefill_chunk=8)
    engine.engine.lookahead = lookahead
    engine.run(next_request, lambda request, run: runs.setdefault(request.key, run),
               sampling=SamplingParams())
    want = _one_at_a_time(model, [first, second], SamplingParams())
    assert runs[0].token_ids == want[0].token_ids and runs[1].token_ids == want[1].token_ids


def test_a_row_view_is_that_row_of_the_cache(model):
    cache = _cache(model, 3)
    row = cache.row(1)
    assert (row.batch, row.capacity) == (1, CAPACITY)
    assert row.keys.data_ptr() == cache.keys[:, 1].data_ptr() and row.graph_layers == cache.graph_layers


def test_an_fp8_row_view_is_that_row_of_the_store(model):
    store = _cache(model, 3, "fp8")
    row = store.row(2)
    assert (row.batch, row.capacity, row.graph_layers) == (1, CAPACITY, store.graph_layers)
    for whole, part in zip(store._dev[1].tensors(), row._dev[1].tensors()):
        assert part.data_ptr() == whole[2:].data_ptr() and part.shape[0] == 1


def test_a_store_with_host_layers_has_no_row_views(model):
    config = model.config
    store = OffloadedKVStore(config.num_hidden_layers, 2, CAPACITY, config.num_key_value_heads,
                             config.head_dim, model.dtype, model.device, host_layers=frozenset({1}))
    with pytest.raises(FacliError, match=r"^expected a KV store without host layers for a row "
                                         r"view, got host layers \[1\]$"):
        store.row(0)


def test_rotary_per_sequence_matches_each_start():
    config = ModelConfig.from_dict({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
                                    "num_hidden_layers": 1, "intermediate_size": 128,
                                    "vocab_size": 32, "max_position_embeddings": 4096})
    rotary = RotaryEmbedding(config, torch.device("cpu"))
    starts = [0, 7, 4000]
    cos, sin = rotary.cos_sin(torch.tensor(starts), 2, torch.float32)
    for index, start in enumerate(starts):
        want_cos, want_sin = rotary.cos_sin(start, 2, torch.float32)
        assert torch.equal(cos[index], want_cos) and torch.equal(sin[index], want_sin)


@requires_cuda
@pytest.mark.parametrize("store", ["device", "fp8"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_rows_on_the_gpu_with_graphs(tmp_path, dtype, store):
    """bf16/fp16 on a GPU: the graphed step of 8 rows against each prompt alone. Batched GEMMs
    round differently from the one-row kernel, so logits are compared, not whole generations."""
    model = _model(tmp_path, dtype, "cuda")
    requests = _requests(model)
    cache = _cache(model, len(requests), store)
    steps = Engine(model, cache, prefill_chunk=8)
    singles = []
    for index, request in enumerate(requests):
        ids = torch.tensor([request.prompt_ids], device="cuda")
        model(ids, 0, cache.row(index))
        alone = _cache(model, 1, store)
        model(ids, 0, alone)
        singles.append(alone)
    tokens = torch.tensor([r.prompt_ids[-1] for r in requests], device="cuda")
    positions = torch.tensor([len(r.prompt_ids) for r in requests], device="cuda")
    for step in range(3):
        together = steps.decode_step(tokens, positions)
        assert steps._graphed_step is not None and steps._graphed_step.captured
        for index, alone in enumerate(singles):
            want = model(tokens[index:index + 1, None], int(positions[index]), alone)
            torch.testing.assert_close(together[index:index + 1], want, rtol=0.05, atol=0.05)
        tokens, positions = together.argmax(-1), positions + 1
