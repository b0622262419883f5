"""The planner's byte counts against what the runtime's objects actually allocate (on the CPU)."""

import pytest
import torch

from facli.models.config import ModelConfig
from facli.models.recipe_loader import load_model_recipe
from facli.offload.device_cache import DeviceKVCache
from facli.planner.memory import (
    activation_breakdown,
    activation_bytes,
    device_memory,
    weight_bytes,
)

TINY = ModelConfig.from_dict({
    "model_type": "llama", "vocab_size": 257, "hidden_size": 64, "intermediate_size": 96,
    "num_hidden_layers": 5, "num_attention_heads": 8, "num_key_value_heads": 4})


@pytest.mark.parametrize("kv_dtype", [None, "fp8"], ids=["bf16", "fp8"])
@pytest.mark.parametrize("host", [(), (1,), (0, 2, 4)], ids=["no-host", "1-host", "3-host"])
def test_kv_and_staging_match_the_offloaded_store(kv_dtype, host):
    store_module = pytest.importorskip("facli.offload.kv_store")
    batch, capacity = 2, 100
    store = store_module.OffloadedKVStore(
        TINY.num_hidden_layers, batch, capacity, TINY.num_key_value_heads, TINY.head_dim,
        torch.bfloat16, "cpu", host_layers=frozenset(host), kv_dtype=kv_dtype)
    memory = device_memory(TINY, ctx=capacity, batch=batch, tp=1,
                           gpu_layers=TINY.num_hidden_layers - len(host), host_layers=len(host),
                           chunk=16, weight_dtype_bytes=2,
                           kv_dtype_bytes=1 if kv_dtype == "fp8" else 2)
    assert memory.kv + memory.kv_staging == store.gpu_bytes()


def test_resident_kv_matches_the_device_cache():
    memory = device_memory(TINY, ctx=77, batch=3, tp=1, gpu_layers=5, host_layers=0, chunk=16,
                           weight_dtype_bytes=2, kv_dtype_bytes=2)
    assert memory.kv == DeviceKVCache.bytes_needed(5, 3, 77, 4, TINY.head_dim, 2) and memory.kv_staging == 0


@pytest.mark.parametrize("name", ["llama-7b", "llama-3-8b", "qwen2-7b"])
def test_weights_match_the_parameter_count(name):
    config = load_model_recipe(name).config
    assert weight_bytes(config, 2) == 2 * config.num_parameters()


def test_weights_match_a_transformers_model():
    transformers = pytest.importorskip("transformers")
    raw = {"vocab_size": 257, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
           "num_attention_heads": 8, "num_key_value_heads": 4, "tie_word_embeddings": False}
    hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**raw))
    config = ModelConfig.from_dict({"model_type": "qwen2", **raw})
    assert weight_bytes(config, 4) == sum(p.numel() * 4 for p in hf.parameters())


def test_activation_terms_are_named_and_linear_in_the_chunk():
    config = load_model_recipe("llama-7b").config
    terms = activation_breakdown(config, 1024, 1, 2)
    assert {"residual_and_normed", "q", "k_and_v", "attention_out", "mlp_gate_up_and_product",
            "logits"} <= set(terms)
    assert terms["mlp_gate_up_and_product"] == 3 * 1024 * 11008 * 2
    # Llama-7B: the MLP phase (3 x intermediate) is the peak, over the residual and norm output.
    assert activation_bytes(config, 1024, 1, 2) == (
        terms["residual_and_normed"] + terms["rope_cos_sin"] + terms["mlp_gate_up_and_product"]
        + terms["logits"])
    fixed = terms["logits"]
    assert activation_bytes(config, 2048, 1, 2) - fixed == 2 * (activation_bytes(config, 1024, 1, 2) - fixed)
    assert activation_bytes(config, 1024, 1, 2, tp=4) < activation_bytes(config, 1024, 1, 2)


def test_a_batch_is_prefilled_one_sequence_at_a_time():
    """Rows of a batch are prefilled one after another (facli.run.batching): the peak activations
    are one sequence's chunk, while the KV cache holds every row."""
    config = load_model_recipe("llama-7b").config
    shape = dict(ctx=4096, tp=1, gpu_layers=32, host_layers=0, chunk=2048, weight_dtype_bytes=2,
                 kv_dtype_bytes=2)
    one, many = device_memory(config, batch=1, **shape), device_memory(config, batch=16, **shape)
    assert many.activations == one.activations and many.kv == 16 * one.kv
