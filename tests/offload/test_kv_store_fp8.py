"""fp8 (e4m3) KV: accuracy against a float32 cache, and the same results wherever layers live."""

import pytest
import torch
from conftest import requires_cuda
from kernel_checks import assert_within_torch_error
from kv_store_cases import (
    BATCH,
    CAPACITY,
    CHUNKS,
    HEAD_DIM,
    KV_HEADS,
    LAYERS,
    Q_HEADS,
    _attention_over_stored_rows,
    _device_cache,
    _offloaded,
    _run,
    _steps,
)

import facli.kernels as kernels
from facli.kernels import common
from facli.offload import kv_store
from facli.offload.fp8 import E4M3_MAX, dequantize, quantize
from facli.offload.kv_parts import KVPart


def _relative_error(got, want):
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def test_quantize_round_trip_within_e4m3_rounding():
    x = torch.randn(2, 33, 4, 64) * torch.logspace(-3, 3, 4).view(1, 1, 4, 1)
    values, scales = quantize(x)
    assert values.float().abs().amax() <= E4M3_MAX
    back = dequantize(values, scales, torch.float32)
    # 3 mantissa bits: round to nearest is within 2^-4 of the value, or near zero within half
    # a subnormal step (2^-9 in e4m3 units, so 2^-10 times the scale).
    bound = torch.maximum(x.abs() * 2**-4, scales.unsqueeze(-1) * 2**-10)
    assert torch.all((back - x).abs() <= bound * 1.0001)


def test_zero_vectors_stay_zero():
    values, scales = quantize(torch.zeros(1, 3, 2, 64))
    assert torch.all(dequantize(values, scales, torch.float32) == 0)


@pytest.mark.parametrize("mode", ["prefetch", "cpu", "split"])
def test_fp8_attention_error_against_float32(mode):
    """Bound 5e-2 on the relative (Frobenius) error of the attention output: e4m3 rounds each
    element to within 2^-4, about 2^-4 / sqrt(3) = 3.6% RMS, and the output is a softmax average of
    V rows with scores perturbed by the K error. Measured here: 3.2%, against 0.2% for a bf16
    cache on the same inputs (16x: 4 fewer mantissa bits)."""
    steps = _steps()
    want = _run(_device_cache(), steps)
    got = _run(_offloaded((1, 2), mode, kv_dtype="fp8"), steps)
    bf16_steps = [(s, q, k.bfloat16().float(), v.bfloat16().float()) for s, q, k, v in steps]
    bf16 = _relative_error(_run(_device_cache(), bf16_steps), want)
    error = _relative_error(got, want)
    assert bf16 < error < 5e-2


@pytest.mark.parametrize("pack", [False, True], ids=["unpacked", "packed"])
@pytest.mark.parametrize("mode", ["prefetch", "cpu", "split"])
@pytest.mark.parametrize("host", [(0,), (1, 2), (0, 1, 2, 3)], ids=["one", "two", "all"])
def test_fp8_same_wherever_layers_live(mode, host, pack):
    steps = _steps()
    want = _run(_offloaded((), mode, kv_dtype="fp8"), steps)
    got = _run(_offloaded(host, mode, kv_dtype="fp8", gpu_prefix_tokens=6, pack_slots=pack), steps)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["prefetch", "cpu", "split"])
def test_fp8_small_tiles_and_ring(monkeypatch, mode):
    """GPU fp8 rows attended in 8-row tiles merged by LSE, host fp8 rows staged through a
    5-row ring: the same results as one tile and one ring pass."""
    steps = _steps()
    want = _run(_offloaded((), mode, kv_dtype="fp8"), steps)
    monkeypatch.setattr(kv_store, "FP8_TILE", 8)
    monkeypatch.setattr(kv_store, "RAW_ROWS", 5)
    for host in [(), (1, 3)]:
        got = _run(_offloaded(host, mode, kv_dtype="fp8", gpu_prefix_tokens=19), steps)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_fp8_tiles_end_with_the_chunk_and_stay_within_the_tile(monkeypatch):
    """Prefill over GPU fp8 rows reads at most FP8_TILE rows per tile (or the chunk alone, where
    it is longer), the last tile ending with the chunk's own rows; a prefix and chunk within one
    tile are one read."""
    tile = 16
    monkeypatch.setattr(kv_store, "FP8_TILE", tile)
    reads = []
    original = KVPart.read

    def spy(self, stop, dtype, first=0):
        reads.append((first, stop))
        return original(self, stop, dtype, first)

    monkeypatch.setattr(KVPart, "read", spy)
    store = _offloaded((), "prefetch", kv_dtype="fp8")
    start = 0
    for chunk in CHUNKS:  # 7, 13, 1, 20 rows: stops at 7, 20, 21, 41
        reads.clear()
        q = torch.randn(BATCH, chunk, Q_HEADS, HEAD_DIM)
        kv = torch.randn(BATCH, chunk, KV_HEADS, HEAD_DIM)
        store.attend(0, q, kv, kv, start)
        stop = start + chunk
        assert reads[-1][1] == stop and reads[-1][0] <= start and reads[0][0] == 0
        assert all(b == a for (_, b), (a, _) in zip(reads, reads[1:])), reads
        assert all(last - first <= max(tile, chunk) for first, last in reads), reads
        if stop <= tile:
            assert reads == [(0, stop)]
        start = stop


@pytest.mark.parametrize("mode", ["prefetch", "cpu"])
def test_fp8_rows_go_whole_to_a_prefill_kernel_that_reads_e4m3(monkeypatch, mode):
    """Where the prefill kernel reads e4m3 at its 16-bit speed (Hopper), chunks attend over the
    stored fp8 rows in one call with their scales, causally from the chunk's start: the same
    results as through dequantized tiles."""
    steps = _steps()
    monkeypatch.setattr(kv_store, "FP8_TILE", 8)
    want = _run(_offloaded((), mode, kv_dtype="fp8", gpu_prefix_tokens=19), steps)
    calls = []

    def spy(q, k, v, **kwargs):
        calls.append((k.shape[1], kwargs["q_offset"], kwargs["causal"], kwargs.get("k_scales") is not None))
        return kernels.prefill_attention(q, k, v, **kwargs)

    monkeypatch.setattr(kv_store, "prefill_reads_fp8_at_speed", lambda q: q.shape[1] > 1)
    monkeypatch.setattr(kv_store, "prefill_attention", spy)
    for host in [(), (1, 3)]:
        calls.clear()
        got = _run(_offloaded(host, mode, kv_dtype="fp8", gpu_prefix_tokens=19), steps)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        # CHUNKS 7, 13, (1), 20: GPU layers attend over rows 0..7, then 0..20 from position 7,
        # in one call each, with the scales (host layers' staged slots hold the model dtype)
        assert (7, 0, True, True) in calls and (20, 7, True, True) in calls, calls


@requires_cuda
@pytest.mark.parametrize("host,mode", [((), "prefetch"), ((1, 3), "cpu")],
                         ids=["gpu-layers", "cpu-decode-over-gpu-prefix"])
def test_fp8_gpu_rows_read_by_the_kernels_match_float64(monkeypatch, host, mode):
    """On a GPU that reads e4m3, decode over fp8 GPU rows passes the rows and scales to the decode
    kernel as stored, and prefill attends over dequantized tiles: outputs against float64
    attention over the stored rows, within twice the error of PyTorch's bfloat16 attention over
    them."""
    if not common.reads_e4m3(torch.device("cuda")):
        pytest.skip("the kernels read e4m3 from compute capability 8.9")
    scaled = []
    for name in ("prefill_attention", "decode_attention"):
        def spy(*args, _kernel=getattr(kernels, name), _name=name, **kwargs):
            scaled.append((_name, kwargs.get("k_scales") is not None))
            return _kernel(*args, **kwargs)
        monkeypatch.setattr(kv_store, name, spy)
    steps = _steps(torch.bfloat16, "cuda")
    store = _offloaded(host, mode, torch.bfloat16, "cuda", kv_dtype="fp8", gpu_prefix_tokens=9)
    got = _run(store, steps).cpu()
    assert ("decode_attention", True) in scaled and ("prefill_attention", True) not in scaled
    want, same_dtype = _attention_over_stored_rows(store, steps)
    assert_within_torch_error(got, want, same_dtype)


def test_gpu_parts_store_scales_by_head_and_host_parts_by_position():
    """The decode kernel reads one head's scales a tile of positions at a time: on the GPU they
    lie together; host parts copy contiguous runs of positions."""
    store = _offloaded((1, 2), "prefetch", kv_dtype="fp8")
    for part in store._dev:
        assert part.k_scales.shape == (BATCH, part.k.shape[1], KV_HEADS)
        assert part.k_scales.stride(1) == 1 and part.v_scales.stride() == part.k_scales.stride()
    for part in (store._host[1], store._host[2], store._raw):
        assert part.k_scales.is_contiguous() and part.v_scales.is_contiguous()


def test_fp8_bytes():
    fp8_layer = 2 * BATCH * CAPACITY * KV_HEADS * (HEAD_DIM + 4)  # 1-byte values + f32 scales
    store = _offloaded((1, 2, 3), "prefetch", kv_dtype="fp8")
    assert store.host_bytes() == 3 * fp8_layer
    slots = 2 * 2 * BATCH * CAPACITY * KV_HEADS * HEAD_DIM * 4  # staging stays in the model dtype
    ring = 2 * BATCH * CAPACITY * KV_HEADS * (HEAD_DIM + 4)  # capacity < RAW_ROWS here
    assert store.gpu_bytes() == fp8_layer + slots + ring


