"""A decode step's rotate-and-store kernel against Hugging Face's rotary embedding, index_put
and fp8.quantize: the rotated q, the cache rows at each sequence's position (bf16/fp16/fp32 as
they are, fp8 as quantize's bytes and scales) and nothing else written."""

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from conftest import requires_cuda
from kernel_checks import poison_allocations

from facli.kernels import elementwise
from facli.kernels.token_store import rotate_and_store_token_triton
from facli.offload.fp8 import FP8, quantize

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU tensors need the interpreter
CPU_DTYPES = [torch.float32, torch.float16]  # the interpreter's bf16 arithmetic is wrong
DTYPES = [torch.bfloat16, torch.float16, torch.float32] if DEVICE == "cuda" else CPU_DTYPES
UNWRITTEN = 0x55


def _step(batch, q_heads, kv_heads, head_dim, dtype, per_sequence):
    """q, k, v as views of one [B, 1, (Hq + 2 Hkv) * D] projection output (as the model splits
    it), and cos, sin [B, 1, D] (a position per sequence) or [1, D]."""
    qkv = torch.randn(batch, 1, (q_heads + 2 * kv_heads) * head_dim, device=DEVICE) * 3
    qkv[0, 0, q_heads * head_dim:(q_heads + 1) * head_dim] = 0.0  # a zero K vector
    q, k, v = qkv.to(dtype).split([q_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], -1)
    q, k, v = (t.view(batch, 1, -1, head_dim) for t in (q, k, v))
    angles = torch.randn(*((batch,) if per_sequence else ()), 1, head_dim // 2, device=DEVICE) * 40
    angles = torch.cat((angles, angles), -1)
    return q, k, v, angles.cos().to(dtype), angles.sin().to(dtype)


def _hf_rotated(x, cos, sin):
    hf_cos, hf_sin = (cos, sin) if cos.dim() == 3 else (cos[None], sin[None])
    rotated, _ = apply_rotary_pos_emb(x.transpose(1, 2), x.transpose(1, 2), hf_cos, hf_sin)
    return rotated.transpose(1, 2)


def _caches(batch, capacity, kv_heads, head_dim, dtype, fp8):
    if not fp8:
        return [torch.full((batch, capacity, kv_heads, head_dim), float("nan"), dtype=dtype,
                           device=DEVICE) for _ in range(2)], (None, None)
    values = [torch.full((batch, capacity, kv_heads, head_dim), UNWRITTEN, dtype=torch.uint8,
                         device=DEVICE).view(FP8) for _ in range(2)]
    return values, [torch.full((batch, capacity, kv_heads), -1.0, device=DEVICE) for _ in range(2)]


def _check_rows(cache, scales, x, positions, *, exact_bytes=True):
    """Row b of cache at positions[b] holds x[b] (quantized where scales is given); no other."""
    for b, position in enumerate(positions):
        others = torch.ones(cache.shape[1], dtype=torch.bool)
        others[position] = False
        if scales is None:
            assert torch.equal(cache[b, position], x[b, 0])
            assert cache[b, others.to(cache.device)].isnan().all()
            continue
        values, expected = quantize(x[b:b + 1])
        # Compared as bytes: CUDA's indexing kernels need not take float8.
        stored = cache.view(torch.uint8)
        if exact_bytes:
            assert torch.equal(stored[b, position], values[0, 0].view(torch.uint8))
            assert torch.equal(scales[b, position], expected[0, 0])
        else:  # the interpreter's e4m3 cast drops a rounding carry: scales only, to float64's
            want = x[b, 0].double().abs().amax(-1).clamp_min(1e-12) / 448
            torch.testing.assert_close(scales[b, position].double(), want, rtol=2e-7, atol=0)
        assert (stored[b, others.to(stored.device)] == UNWRITTEN).all()
        assert (scales[b, others.to(scales.device)] == -1).all()


CASES = {
    "mha-B1-D128": (1, 4, 4, 128, False),
    "gqa-B3-D64-each-own-position": (3, 6, 2, 64, True),
    "gqa-B2-D80-one-position": (2, 8, 2, 80, False),
}


@pytest.mark.parametrize("fp8", [False, True], ids=["as-is", "fp8"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_rotated_q_and_stored_rows_as_hugging_face_and_quantize(case, dtype, fp8, monkeypatch):
    poison_allocations(monkeypatch)
    batch, q_heads, kv_heads, head_dim, per_sequence = case
    capacity = 33
    q, k, v, cos, sin = _step(batch, q_heads, kv_heads, head_dim, dtype, per_sequence)
    positions = [0, 32, 17][:batch] if per_sequence else [9] * batch
    position = torch.tensor(positions if per_sequence else positions[:1], device=DEVICE)
    (k_cache, v_cache), (k_scales, v_scales) = _caches(batch, capacity, kv_heads, head_dim, dtype, fp8)
    out = rotate_and_store_token_triton(q, k, v, cos, sin, k_cache, v_cache, position,
                                        k_scales, v_scales)
    assert torch.equal(out, _hf_rotated(q, cos, sin))
    exact = DEVICE == "cuda"
    _check_rows(k_cache, k_scales, _hf_rotated(k, cos, sin), positions, exact_bytes=exact)
    _check_rows(v_cache, v_scales, v, positions, exact_bytes=exact)


@pytest.mark.parametrize("fp8", [False, True], ids=["as-is", "fp8"])
def test_the_cpu_reference_stores_as_the_kernel(fp8):
    """elementwise.rotate_and_store_token on CPU tensors (the CPU path), into a head-major cache
    as the CPU's DeviceKVCache keeps it."""
    batch, q_heads, kv_heads, head_dim, capacity = 3, 4, 2, 64, 20
    q, k, v, cos, sin = (t.cpu() for t in _step(batch, q_heads, kv_heads, head_dim, torch.float32, True))
    caches, (k_scales, v_scales) = _caches(batch, capacity, kv_heads, head_dim, torch.float32, fp8)
    k_cache, v_cache = (c.cpu().transpose(1, 2).contiguous().transpose(1, 2) for c in caches)
    k_scales, v_scales = (s.cpu() if s is not None else None for s in (k_scales, v_scales))
    positions = [4, 0, 19]
    out = elementwise.rotate_and_store_token(q, k, v, cos, sin, k_cache, v_cache,
                                             torch.tensor(positions), k_scales=k_scales, v_scales=v_scales)
    assert torch.equal(out, _hf_rotated(q, cos, sin))
    _check_rows(k_cache, k_scales, _hf_rotated(k, cos, sin), positions)
    _check_rows(v_cache, v_scales, v, positions)


def test_refuses_what_it_cannot_store():
    q, k, v, cos, sin = _step(1, 2, 2, 64, torch.float32, False)
    (k_cache, v_cache), _ = _caches(1, 8, 2, 64, torch.float32, False)
    with pytest.raises(ValueError, match=r"q \[B, 1, Hq, D\]"):
        rotate_and_store_token_triton(q.expand(1, 2, 2, 64), k, v, cos, sin, k_cache, v_cache,
                                      torch.tensor([0], device=DEVICE))
    with pytest.raises(ValueError, match="expected 1 or 1 positions"):
        rotate_and_store_token_triton(q, k, v, cos, sin, k_cache, v_cache,
                                      torch.tensor([0, 1], device=DEVICE))
    with pytest.raises(ValueError, match="both K and V scales"):
        rotate_and_store_token_triton(q, k, v, cos, sin, k_cache, v_cache,
                                      torch.tensor([0], device=DEVICE), torch.zeros(1, 8, 2), None)


@requires_cuda
def test_a_captured_graph_stores_at_the_position_it_is_replayed_with():
    q, k, v, cos, sin = _step(1, 4, 2, 128, torch.bfloat16, False)
    (k_cache, v_cache), _ = _caches(1, 16, 2, 128, torch.bfloat16, False)
    position = torch.tensor([3], device="cuda")
    rotate_and_store_token_triton(q, k, v, cos, sin, k_cache, v_cache, position)  # compiles
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        rotate_and_store_token_triton(q, k, v, cos, sin, k_cache, v_cache, position)
    k_cache.fill_(float("nan"))
    position.fill_(11)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(k_cache[0, 11], _hf_rotated(k, cos, sin)[0, 0])
    assert k_cache[0, :11].isnan().all() and k_cache[0, 12:].isnan().all()
