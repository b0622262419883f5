"""Decode steps queued ahead of the host's reads (Engine.lookahead, on by default on a GPU): the
same tokens, finish reasons and cache as reading each token before the next step, against
transformers' generate. The CPU runs the queue logic here with lookahead set by hand."""

import pytest
import torch
from checkpoints import build_checkpoint

from facli.models.checkpoint import CheckpointReader
from facli.models.config import ModelConfig
from facli.models.llama import CausalLM
from facli.offload.device_cache import DeviceKVCache
from facli.run.engine import Engine, HostReads
from facli.run.sampling import Sampler, SamplingParams

CPU = torch.device("cpu")
PROMPT = [5, 9, 2, 7, 7, 1, 30, 4, 11]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama-lookahead")
    reference = build_checkpoint(directory, "llama", num_key_value_heads=2)
    reference.generation_config.eos_token_id = None
    model = CausalLM(ModelConfig.from_dir(directory), dtype=torch.float32, device="cpu")
    model.load(CheckpointReader(directory))
    return reference, model


def _engine(model, lookahead: int, capacity: int = 64) -> Engine:
    config = model.config
    cache = DeviceKVCache(config.num_hidden_layers, 1, capacity, config.num_key_value_heads,
                          config.head_dim, torch.float32, CPU)
    engine = Engine(model, cache, prefill_chunk=4)
    engine.lookahead = lookahead
    return engine


def _reference_tokens(reference, new_tokens: int) -> list[int]:
    prompt = torch.tensor([PROMPT])
    with torch.no_grad():
        out = reference.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                 max_new_tokens=new_tokens, pad_token_id=0)
    return out[0, len(PROMPT):].tolist()


@pytest.mark.parametrize("lookahead", [0, 1, 3])
def test_queued_steps_give_transformers_tokens(pair, lookahead):
    reference, model = pair
    run = _engine(model, lookahead).generate(PROMPT, max_new_tokens=20,
                                             sampler=Sampler(SamplingParams(), CPU))
    assert run.token_ids == _reference_tokens(reference, 20)
    assert run.finish_reason == "length"
    assert run.timings.decode_steps == 19 - 1  # timed from the end of the first decode step


@pytest.mark.parametrize("lookahead", [1, 2])
def test_a_stop_midway_ends_where_reading_each_token_ends(pair, lookahead):
    """EOS at the 6th token and on_token asking to stop at the 4th: the same tokens and reason as
    lookahead 0, though steps past them were queued."""
    reference, model = pair
    tokens = _reference_tokens(reference, 12)
    eos = tokens[5]
    expected_eos = tokens[:tokens.index(eos) + 1]
    sampler = SamplingParams(repetition_penalty=1.3, temperature=0.7, seed=3)
    for engine_lookahead in (0, lookahead):
        run = _engine(model, engine_lookahead).generate(
            PROMPT, max_new_tokens=12, sampler=Sampler(SamplingParams(), CPU), eos_ids=(eos,))
        assert (run.token_ids, run.finish_reason) == (expected_eos, "eos")
        seen = []
        run = _engine(model, engine_lookahead).generate(
            PROMPT, max_new_tokens=12, sampler=Sampler(sampler, CPU),
            on_token=lambda token: seen.append(token) or len(seen) == 4)
        assert (run.token_ids, run.finish_reason) == (seen, "stop") and len(seen) == 4
        if engine_lookahead == 0:
            sampled = seen
    assert seen == sampled


def test_queued_steps_stop_at_a_full_cache(pair):
    """A cache with room for the prompt and 6 more positions: 7 tokens, no step queued past it."""
    reference, model = pair
    engine = _engine(model, lookahead=2, capacity=len(PROMPT) + 6)
    run = engine.generate(PROMPT, max_new_tokens=50, sampler=Sampler(SamplingParams(), CPU))
    assert run.token_ids == _reference_tokens(reference, 7)


def test_host_reads_come_back_in_order_and_refuse_an_overfull_queue():
    reads = HostReads(CPU, slots=2)
    reads.push(torch.tensor([4, 8]))
    reads.push(torch.tensor([6]))
    with pytest.raises(AssertionError):
        reads.push(torch.tensor([1]))
    assert reads.pop() == 4
    reads.push(torch.tensor([9]))
    assert [reads.pop(), reads.pop()] == [6, 9]
