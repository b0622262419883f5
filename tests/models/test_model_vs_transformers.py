"""facli's model and engine against transformers' own model classes on the same checkpoints."""

import copy

import pytest
import torch

from checkpoints import build_checkpoint
from facli.models.checkpoint import CheckpointReader
from facli.models.config import ModelConfig
from facli.models.llama import CausalLM
from facli.offload.device_cache import DeviceKVCache
from facli.run.engine import Engine
from facli.run.sampling import Sampler, SamplingParams

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 128}

ARCHITECTURES = {
    "llama-mha": ("llama", {}),
    "llama-gqa4": ("llama", dict(num_attention_heads=8, num_key_value_heads=2, hidden_size=128)),
    "llama3-rope-tied": ("llama", dict(num_key_value_heads=2, rope_scaling=LLAMA3_SCALING,
                                       tie_word_embeddings=True, rope_theta=500000.0)),
    "llama-linear-rope-bias": ("llama", dict(rope_scaling={"rope_type": "linear", "factor": 4.0},
                                             attention_bias=True)),
    "mistral-gqa": ("mistral", dict(num_key_value_heads=2)),
    "qwen2-gqa": ("qwen2", dict(num_key_value_heads=2)),
}


@pytest.fixture(scope="module", params=list(ARCHITECTURES), ids=list(ARCHITECTURES))
def pair(request, tmp_path_factory):
    model_type, overrides = ARCHITECTURES[request.param]
    directory = tmp_path_factory.mktemp(request.param)
    reference = build_checkpoint(directory, model_type, **overrides)
    config = ModelConfig.from_dir(directory)
    model = CausalLM(config, dtype=torch.float32, device="cpu")
    model.load(CheckpointReader(directory))
    return reference, model, config


def _engine(model, config, chunk, capacity=400):
    cache = DeviceKVCache(config.num_hidden_layers, 1, capacity, config.num_key_value_heads,
                          config.head_dim, torch.float32, torch.device("cpu"))
    return Engine(model, cache, prefill_chunk=chunk)


def _relative_error(actual, expected):
    return ((actual - expected).norm() / expected.norm()).item()


@pytest.mark.parametrize("prompt_len,chunk", [(1, 16), (7, 3), (300, 128), (300, 77)],
                         ids=["T1", "T7-chunk3", "T300-chunk128", "T300-chunk77"])
def test_final_logits_match(pair, prompt_len, chunk):
    reference, model, config = pair
    ids = torch.randint(0, config.vocab_size, (1, prompt_len))
    with torch.no_grad():
        expected = reference(ids).logits[:, -1].float()
    actual = _engine(model, config, chunk).prefill(ids)
    assert _relative_error(actual, expected) < 1e-4


@pytest.mark.parametrize("prompt_len,chunk", [(1, 16), (7, 4), (300, 77)],
                         ids=["T1", "T7-chunk4", "T300-chunk77"])
def test_greedy_tokens_match(pair, prompt_len, chunk):
    reference, model, config = pair
    prompt = torch.randint(0, config.vocab_size, (1, prompt_len))
    reference.generation_config.eos_token_id = None  # run all 32 steps, as the engine below does
    with torch.no_grad():
        expected = reference.generate(prompt, attention_mask=torch.ones_like(prompt),
                                      max_new_tokens=32, do_sample=False,
                                      pad_token_id=0)[0, prompt_len:].tolist()
    run = _engine(model, config, chunk).generate(
        prompt[0].tolist(), max_new_tokens=32, sampler=Sampler(SamplingParams(), torch.device("cpu")))
    assert run.token_ids == expected


def test_all_position_logits_match(pair):
    reference, model, config = pair
    ids = torch.randint(0, config.vocab_size, (1, 45))
    with torch.no_grad():
        expected = reference(ids).logits.float()
    cache = _engine(model, config, 45).kv
    actual = model(ids, 0, cache, all_logits=True)
    assert _relative_error(actual, expected) < 1e-4


def test_cpu_matrices_are_input_major(pair):
    """On the CPU, until packed, every projection and the LM head are stored input-major
    (strides (1, out)), the layout the matches above ran with."""
    _, model, config = pair
    matrices = [layer_matrix for layer in model.layers for layer_matrix in (
        layer.self_attn.qkv_proj.weight, layer.self_attn.o_proj.weight,
        layer.mlp.gate_up_proj.weight, layer.mlp.down_proj.weight)]
    head = model.embed_tokens.weight if config.tie_word_embeddings else model.lm_head.weight
    for matrix in matrices + [head]:
        assert matrix.stride() == (1, matrix.shape[0])


@pytest.fixture(scope="module")
def packed(pair):
    """The pair's facli model with its layer matrices in oneDNN's packed CPU layout, as a
    float32 CPU runtime runs them."""
    reference, model, config = pair
    packed_model = copy.deepcopy(model)
    if not packed_model.pack_on_cpu():
        pytest.skip("this PyTorch build has no oneDNN packing")
    return reference, packed_model, config


def test_packed_cpu_matrices_are_packed(packed):
    _, model, _ = packed
    assert all(linear.weight.is_mkldnn for layer in model.layers for linear in (
        layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj))


@pytest.mark.parametrize("prompt_len,chunk", [(1, 16), (300, 77)], ids=["T1", "T300-chunk77"])
def test_packed_final_logits_match(packed, prompt_len, chunk):
    test_final_logits_match(packed, prompt_len, chunk)


def test_packed_greedy_tokens_match(packed):
    test_greedy_tokens_match(packed, 7, 4)


def test_packed_all_position_logits_match(packed):
    test_all_position_logits_match(packed)
