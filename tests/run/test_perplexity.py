"""Perplexity by sliding windows against the same windows scored by transformers' own model."""

import math

import pytest
import torch

from checkpoints import build_checkpoint
from facli.models.checkpoint import CheckpointReader
from facli.models.config import ModelConfig
from facli.models.llama import CausalLM
from facli.offload.device_cache import DeviceKVCache
from facli.perplexity import perplexity, sliding_windows
from perplexity_cases import reference_nll


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ppl")
    reference = build_checkpoint(directory, "llama", num_key_value_heads=2)
    config = ModelConfig.from_dir(directory)
    model = CausalLM(config, dtype=torch.float32, device="cpu")
    model.load(CheckpointReader(directory))
    return reference, model, config


@pytest.mark.parametrize("length,ctx,stride,chunk", [
    (2, 8, 8, 8), (63, 64, 64, 16), (200, 64, 64, 64), (200, 64, 16, 24), (131, 50, 33, 7),
], ids=["T2", "T63-one-window", "T200-disjoint", "T200-stride16-chunk24", "T131-odd"])
def test_matches_transformers_windows(pair, length, ctx, stride, chunk):
    reference, model, config = pair
    ids = torch.randint(0, config.vocab_size, (length,)).tolist()
    kv = DeviceKVCache(config.num_hidden_layers, 1, ctx, config.num_key_value_heads,
                       config.head_dim, torch.float32, torch.device("cpu"))
    result = perplexity(model, kv, ids, ctx=ctx, stride=stride, chunk=chunk)
    expected_nll, expected_count = reference_nll(reference, ids, ctx, stride)
    assert result.scored == expected_count
    assert result.nll_sum == pytest.approx(expected_nll, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(expected_nll / expected_count), rel=1e-5)


@pytest.mark.parametrize("total,ctx,stride", [(2, 2, 1), (100, 10, 3), (101, 64, 32), (5, 64, 32),
                                               (100, 10, 10)])
def test_windows_score_each_token_once(total, ctx, stride):
    windows = sliding_windows(total, ctx, stride)
    scored = [t for w in windows for t in range(w.score_from, w.end)]
    firsts = {w.begin for w in windows}
    # Overlapping windows score every token but the text's first; disjoint ones skip each
    # window's first token, which nothing in its window precedes.
    assert scored == [t for t in range(1, total) if stride < ctx or t not in firsts]
    assert all(w.end - w.begin <= ctx for w in windows)
    assert windows[-1].end == total
