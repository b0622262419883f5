"""The CPU attention path (PyTorch's CPU flash kernel behind kernels.reference) against the float64
tiled oracle and same-dtype SDPA, and through the model against transformers."""

import pytest
import torch

from checkpoints import build_checkpoint
from facli.kernels import decode_attention, prefill_attention, reference
from facli.kernels.reference import attention_with_lse
from facli.models.checkpoint import CheckpointReader
from facli.models.config import ModelConfig
from facli.models.llama import CausalLM
from facli.offload.device_cache import DeviceKVCache
from facli.run.engine import Engine
from facli.run.sampling import Sampler, SamplingParams
from kernel_checks import assert_within_torch_error, oracle, sdpa_same_dtype


@pytest.fixture
def flash_only(monkeypatch):
    """Fail any call below float64 (the oracle's) that falls back to the tiled loop: the cases
    below must take the flash path."""
    tiled = reference._tiled_with_lse

    def refuse(q, *args, **kwargs):
        assert q.dtype == torch.float64, f"{q.dtype} attention took the tiled loop"
        return tiled(q, *args, **kwargs)

    monkeypatch.setattr(reference, "_tiled_with_lse", refuse)


def _qkv(batch, q_len, k_len, q_heads, kv_heads, head_dim=64, dtype=torch.float32):
    q = torch.randn(batch, q_len, q_heads, head_dim, dtype=dtype)
    k = torch.randn(batch, k_len, kv_heads, head_dim, dtype=dtype)
    v = torch.randn(batch, k_len, kv_heads, head_dim, dtype=dtype)
    return q, k, v


CASES = {  # (batch, q_len, k_len, q_offset, q_heads, kv_heads, causal)
    "T1-gqa1-first": (1, 1, 1, 0, 4, 4, True),
    "T1-gqa3-decode": (2, 1, 63, 62, 9, 3, True),
    "T63-gqa3-prompt": (1, 63, 63, 0, 9, 3, True),
    "T63-gqa4-after-prefix": (2, 63, 200, 137, 8, 2, True),
    "T5-gqa1-mid-cache": (1, 5, 90, 41, 4, 4, True),
    "T63-gqa3-full": (1, 63, 101, 0, 9, 3, False),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_flash_path_matches_float64_oracle(case, flash_only):
    batch, q_len, k_len, offset, q_heads, kv_heads, causal = CASES[case]
    q, k, v = _qkv(batch, q_len, k_len, q_heads, kv_heads)
    out, lse = attention_with_lse(q, k, v, causal=causal, q_offset=offset)
    want_out, want_lse = oracle(q, k, v, causal=causal, q_offset=offset)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    torch.testing.assert_close(out.double(), want_out, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(lse.double(), want_lse, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("lengths", [[1, 50, 17], [33, 33, 33]], ids=["uneven", "even"])
def test_decode_rows_ignore_keys_past_each_length(lengths, flash_only):
    """A batch of decode steps, rows at their own lengths or all at one: keys past each row's
    length hold NaN and must not reach its output."""
    q, k, v = _qkv(3, 1, 50, 9, 3)
    lens = torch.tensor(lengths)
    want, _ = oracle(q, k, v, causal=True, q_offset=lens - 1, key_lens=lens)
    for row, n in enumerate(lens.tolist()):
        k[row, n:], v[row, n:] = float("nan"), float("nan")
    got = decode_attention(q, k, v, lens)
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-5)


def test_chunked_prompt_equals_one_pass(flash_only):
    """A prompt attended in three chunks after their cached prefixes equals one causal pass."""
    q, k, v = _qkv(1, 100, 100, 12, 4)
    whole = prefill_attention(q, k, v, causal=True)
    parts = [prefill_attention(q[:, a:b], k[:, :b], v[:, :b], causal=True, q_offset=a)
             for a, b in ((0, 31), (31, 63), (63, 100))]
    torch.testing.assert_close(torch.cat(parts, dim=1), whole, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("q_len", [1, 63], ids=["T1", "T63"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_within_twice_torch_error(dtype, q_len, flash_only):
    q, k, v = _qkv(1, q_len, 140, 9, 3, dtype=dtype)
    offset = 140 - q_len
    out = prefill_attention(q, k, v, causal=True, q_offset=offset)
    want, _ = oracle(q, k, v, causal=True, q_offset=offset)
    assert out.dtype == dtype
    assert_within_torch_error(out, want, sdpa_same_dtype(q, k, v, causal=True, q_offset=offset))


def test_queries_that_see_no_key_take_the_tiled_loop():
    """Queries before the first key (a negative offset) see nothing: output 0 and lse -inf,
    which the flash kernel cannot express (it would return NaN)."""
    q, k, v = _qkv(1, 4, 6, 4, 2)
    out, lse = attention_with_lse(q, k, v, causal=True, q_offset=-2)
    assert torch.equal(out[:, :2], torch.zeros_like(out[:, :2]))
    assert torch.isinf(lse[..., :2]).all() and torch.isfinite(lse[..., 2:]).all()
    want_out, want_lse = oracle(q, k, v, causal=True, q_offset=-2)
    torch.testing.assert_close(out.double(), want_out, rtol=2e-5, atol=2e-5)


def test_model_with_three_query_heads_per_kv_head_matches_transformers(tmp_path, flash_only):
    """SmolLM2's grouping (9 query heads over 3 KV heads) through the engine on the CPU:
    chunked prefill and decode give transformers' greedy tokens and final logits."""
    hf = build_checkpoint(tmp_path, "llama", num_attention_heads=9, num_key_value_heads=3,
                          hidden_size=144)
    config = ModelConfig.from_dir(tmp_path)
    model = CausalLM(config, dtype=torch.float32, device="cpu")
    model.load(CheckpointReader(tmp_path))
    cache = DeviceKVCache(config.num_hidden_layers, 1, 100, config.num_key_value_heads,
                          config.head_dim, torch.float32, torch.device("cpu"))
    engine = Engine(model, cache, prefill_chunk=37)
    prompt = torch.randint(0, config.vocab_size, (1, 75))
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        want_logits = hf(prompt).logits[:, -1].float()
        want = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12,
                           do_sample=False, pad_token_id=0)[0, 75:].tolist()
    logits = engine.prefill(prompt)
    assert ((logits - want_logits).norm() / want_logits.norm()).item() < 1e-5
    run = engine.generate(prompt[0].tolist(), max_new_tokens=12,
                          sampler=Sampler(SamplingParams(), torch.device("cpu")))
    assert run.token_ids == want


def test_cpu_cache_keeps_each_head_contiguous_and_attends_as_token_major():
    """The CPU cache stores heads outermost (each head's keys one matrix) behind the same
    [B, capacity, Hkv, D] view, and a prompt plus decode steps through it equal the oracle."""
    cache = DeviceKVCache(2, 1, 40, 3, 64, torch.float32, torch.device("cpu"))
    assert cache.keys.shape == (2, 1, 40, 3, 64)
    assert cache.keys[1, 0, :, 2].is_contiguous() and cache.values[1, 0, :, 2].is_contiguous()
    q, k, v = _qkv(1, 23, 23, 9, 3)
    outs = [cache.attend(1, q[:, :20], k[:, :20], v[:, :20], 0)]
    outs += [cache.attend(1, q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], t) for t in range(20, 23)]
    expected, _ = oracle(q, k, v, causal=True)
    torch.testing.assert_close(torch.cat(outs, dim=1), expected.to(torch.float32), rtol=1e-5, atol=1e-5)
