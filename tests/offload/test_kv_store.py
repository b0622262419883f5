"""OffloadedKVStore against DeviceKVCache (and DeviceKVCache against SDPA), on the CPU.

With device=cpu the "host" layers are separate CPU tensors and the copy queues run inline, so
these tests walk the same code paths as a GPU run: staging slots, prefetch, write-back, CPU
attention and the LSE merge.
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import requires_cuda

from kv_store_cases import (
    BATCH,
    CAPACITY,
    CHUNKS,
    DECODE_STEPS,
    HEAD_DIM,
    KV_HEADS,
    LAYERS,
    Q_HEADS,
    _device_cache,
    _offloaded,
    _run,
    _steps,
)

from facli.kernels.elementwise import apply_rotary_reference
from facli.errors import FacliError
from facli.offload.kv_store import OffloadedKVStore
from facli.offload.streams import CopyQueues, host_empty

def test_device_cache_matches_sdpa():
    steps = _steps()
    got = _run(_device_cache(), steps)
    for layer in range(LAYERS):
        q, k, v = (torch.cat([s[i][layer] for s in steps], dim=1).transpose(1, 2)
                   for i in (1, 2, 3))
        group = Q_HEADS // KV_HEADS
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        want = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)
        torch.testing.assert_close(got[layer], want, rtol=1e-5, atol=1e-5)


MODES = ["prefetch", "cpu", "split"]
HOST_SETS = {"none": (), "one": (2,), "two": (0, 3), "three": (0, 1, 3), "all": (0, 1, 2, 3)}


@pytest.mark.parametrize("pack", [False, True], ids=["unpacked", "packed"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("host", list(HOST_SETS), ids=[f"host-{name}" for name in HOST_SETS])
@pytest.mark.parametrize("prefix", [0, 5, 30], ids=lambda p: f"gpu-prefix-{p}")
def test_same_attention_as_device_cache(mode, host, prefix, pack):
    steps = _steps()
    want = _run(_device_cache(), steps)
    got = _run(_offloaded(HOST_SETS[host], mode, gpu_prefix_tokens=prefix, pack_slots=pack), steps)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_packed_slots_keep_every_host_layer_until_one_outgrows_its_rows(mode):
    """Two host layers fit the two slots whole: nothing crosses PCIe host-to-device, whatever
    the mode. Four share them at half the capacity each (27 rows here): the store unpacks at the
    prefill chunk that passes 27 positions, and streams from then on."""
    steps = _steps()
    two = _offloaded((0, 3), mode, pack_slots=True)
    assert two.packed
    _run(two, steps)
    assert two.packed and two.h2d_bytes == 0 and two.d2h_bytes > 0
    four = _offloaded((0, 1, 2, 3), mode, pack_slots=True)
    _run(four, steps[:3])  # 21 positions
    assert four.packed and four.h2d_bytes == 0
    _run(four, steps[3:4])  # 41 positions
    assert not four.packed and four.h2d_bytes > 0
    four.reset()
    assert four.packed


@pytest.mark.parametrize("share", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("host", ["one", "three", "all"])
def test_split_decode_at_any_cpu_share(host, share):
    steps = _steps()
    want = _run(_device_cache(), steps)
    store = _offloaded(HOST_SETS[host], "split", gpu_prefix_tokens=5, cpu_share=share)
    torch.testing.assert_close(_run(store, steps), want, rtol=1e-5, atol=1e-5)


def test_split_decode_streams_only_its_share():
    """With three host layers (more than the two slots) every decode step restages each host
    layer: "prefetch" moves all its rows over PCIe, "split" only the rows left to the GPU."""
    steps = _steps()
    prompt, decode = steps[:len(CHUNKS)], steps[len(CHUNKS):]
    moved = {}
    for mode, share in (("prefetch", 0.0), ("split", 0.25), ("split", 1.0)):
        store = _offloaded((0, 1, 3), mode, cpu_share=share)
        _run(store, prompt)
        before = store.h2d_bytes
        _run(store, decode)
        moved[(mode, share)] = store.h2d_bytes - before
    row = 2 * BATCH * KV_HEADS * HEAD_DIM * 4
    written = [sum(CHUNKS) + i for i in range(DECODE_STEPS)]
    # prefetch: the first step finds layer 0 prefetched after the prompt, then every layer
    # reloads its written rows at each step.
    assert moved[("prefetch", 0.0)] == row * (sum(3 * n for n in written) - written[0]
                                               + written[-1] + 1)
    assert moved[("split", 1.0)] < moved[("split", 0.25)] < moved[("prefetch", 0.0)]
    assert moved[("split", 0.25)] <= 0.8 * moved[("prefetch", 0.0)]


@pytest.mark.parametrize("mode", MODES)
def test_reset_then_rerun(mode):
    store = _offloaded((1, 2, 3), mode)
    _run(store, _steps())
    store.reset()
    steps = _steps()
    want = _run(_device_cache(), steps)
    torch.testing.assert_close(_run(store, steps), want, rtol=1e-5, atol=1e-5)


def test_rewind_overwrites_positions():
    store, reference = _offloaded((1, 3), "prefetch"), _device_cache()
    steps = _steps()
    _run(store, steps)
    _run(reference, steps)
    start, q, k, v = steps[-4]  # redo the last four decode steps with other tokens
    again = [(start, torch.randn_like(q), torch.randn_like(k), torch.randn_like(v))]
    torch.testing.assert_close(_run(store, again), _run(reference, again), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("host, pack", [((0, 2, 3), False), ((0, 2), True)],
                         ids=["unpacked", "packed"])
@pytest.mark.parametrize("mode", MODES)
def test_write_then_decode(mode, host, pack):
    """Positions stored with `write` (no attention) serve later decode steps; packed, they are
    in the slots, and nothing crosses PCIe host-to-device."""
    steps = _steps()
    store = _offloaded(host, mode, gpu_prefix_tokens=4, pack_slots=pack)
    reference = _device_cache()
    prompt = steps[:len(CHUNKS)]
    for start, _, k, v in prompt:
        for layer in range(LAYERS):
            store.write(layer, k[layer], v[layer], start)
    _run(reference, prompt)
    decode = steps[len(prompt):]
    torch.testing.assert_close(_run(store, decode), _run(reference, decode), rtol=1e-5, atol=1e-5)
    assert store.packed == pack
    if pack:
        assert store.h2d_bytes == 0


@pytest.mark.parametrize("mode", MODES)
def test_restart_at_zero_without_reset(mode):
    """A new prompt written from position 0 over an old one (no reset) must not see the old
    layers' staged rows."""
    store, reference = _offloaded((0, 1, 2), mode), _device_cache()
    _run(store, _steps())
    _run(reference, _steps())
    steps = _steps()
    torch.testing.assert_close(_run(store, steps), _run(reference, steps), rtol=1e-5, atol=1e-5)


def test_layer_major_prefill_reloads_nothing():
    """Chunk after chunk of one layer before the next (a layer-major prefill) keeps the layer in
    its slot: besides write-backs only the first host layer crosses PCIe, once, prefetched for
    the next step. Layer by layer within each chunk reloads every prefix."""
    steps = _steps()[:len(CHUNKS)]
    row = 2 * BATCH * KV_HEADS * HEAD_DIM * 4
    chunk_major = _offloaded((0, 1, 3), "prefetch")
    _run(chunk_major, steps)
    layer_major = _offloaded((0, 1, 3), "prefetch")
    outs = {}
    for layer in range(LAYERS):
        outs[layer] = torch.cat([layer_major.attend(layer, q[layer], k[layer], v[layer], start)
                                 for start, q, k, v in steps], dim=1)
    torch.testing.assert_close(torch.stack([outs[i] for i in range(LAYERS)]),
                               _run(_device_cache(), steps), rtol=1e-5, atol=1e-5)
    assert layer_major.h2d_bytes == sum(CHUNKS) * row
    assert layer_major.d2h_bytes == chunk_major.d2h_bytes == 3 * sum(CHUNKS) * row
    # Chunk-major: each host layer reloads its prefix before chunks 2..4 (7, 20 and 21 rows),
    # and the first host layer is prefetched for the next step as well.
    assert chunk_major.h2d_bytes == (3 * (7 + 20 + 21) + sum(CHUNKS)) * row


def test_bytes_split_between_gpu_and_host():
    per_layer = 2 * BATCH * CAPACITY * KV_HEADS * HEAD_DIM * 4
    store = _offloaded((1, 2, 3), "cpu")
    assert store.host_bytes() == 3 * per_layer
    assert store.gpu_bytes() == per_layer + 2 * per_layer  # one GPU layer + two staging slots
    assert _offloaded((), "cpu").gpu_bytes() == 4 * per_layer
    assert _offloaded((), "cpu").host_bytes() == 0
    one = _offloaded((2,), "prefetch")
    assert one.gpu_bytes() == 3 * per_layer + per_layer  # a single host layer needs one slot


def test_rejects_bad_arguments():
    with pytest.raises(FacliError, match="prefetch, cpu, split"):
        _offloaded((), "gpu")
    with pytest.raises(FacliError, match="cpu_share between 0 and 1"):
        _offloaded((1,), "split", cpu_share=1.5)
    with pytest.raises(FacliError, match="fp8"):
        _offloaded((), "cpu", kv_dtype="int8")
    with pytest.raises(FacliError, match=r"0\.\.3"):
        _offloaded((4,), "cpu")
    store = _offloaded((1,), "cpu")
    q, k = torch.randn(BATCH, 1, Q_HEADS, HEAD_DIM), torch.randn(BATCH, 1, KV_HEADS, HEAD_DIM)
    with pytest.raises(ValueError, match="holds 0 positions"):
        store.attend(1, q, k, k, 3)
    with pytest.raises(ValueError, match=f"holds {CAPACITY} positions"):
        store.attend(1, q, k, k, CAPACITY)


@pytest.mark.parametrize("device, dtype", [
    ("cpu", torch.float32),
    pytest.param("cuda", torch.bfloat16, marks=requires_cuda),
])
@pytest.mark.parametrize("kv_dtype", [None, "fp8"])
@pytest.mark.parametrize("host", [(), (0, 2), (3,)], ids=["none", "first-and-third", "last"])
def test_graph_layers_decode_at_tensor_positions(host, kv_dtype, device, dtype):
    """The graph layers' path (position on the device, every row read up to the capacity,
    masked by length; on a GPU an fp8 token quantized and stored by one kernel) stores and
    returns what the int path does, with host layers between them at int positions."""
    steps = _steps(dtype, device)
    by_int = _offloaded(host, "split", dtype, device, kv_dtype=kv_dtype)
    by_tensor = OffloadedKVStore(LAYERS, BATCH, CAPACITY, KV_HEADS, HEAD_DIM, dtype,
                                 torch.device(device), frozenset(host), "split", kv_dtype=kv_dtype,
                                 pack_slots=False)
    assert by_tensor.graph_layers == set(range(LAYERS)) - set(host)
    angles = torch.rand(1, HEAD_DIM // 2, device=device) * 6
    cos, sin = (f(torch.cat((angles, angles), -1)).to(dtype) for f in (torch.cos, torch.sin))
    for index, (start, q, k, v) in enumerate(steps):
        decode = index >= len(CHUNKS)
        for layer in range(LAYERS):
            # The int path takes q and k rotated; the tensor path rotates them as it stores k.
            rotated_q, rotated_k = (apply_rotary_reference(x[layer], cos, sin) for x in (q, k))
            want = by_int.attend(layer, rotated_q, rotated_k, v[layer], start)
            if decode and layer in by_tensor.graph_layers:
                got = by_tensor.attend(layer, q[layer], k[layer], v[layer],
                                       torch.tensor([start], device=device), rotary=(cos, sin))
            else:
                got = by_tensor.attend(layer, rotated_q, rotated_k, v[layer], start)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    stop = steps[-1][0] + 1
    for layer in by_tensor.graph_layers:
        for a, b in zip(by_int._dev[layer].tensors(), by_tensor._dev[layer].tensors()):
            a, b = (t[:, :stop].contiguous().view(torch.uint8) for t in (a, b))
            assert torch.equal(a, b)


def test_tensor_positions_only_in_graph_layers():
    q, k = torch.randn(BATCH, 1, Q_HEADS, HEAD_DIM), torch.randn(BATCH, 1, KV_HEADS, HEAD_DIM)
    store = _offloaded((1,), "prefetch")
    rotary = (torch.ones(1, HEAD_DIM), torch.zeros(1, HEAD_DIM))
    with pytest.raises(FacliError, match=r"graph layers \[0, 2, 3\], with the rotary angles; "
                                         r"layer 1 takes an int"):
        store.attend(1, q, k, k, torch.tensor([0]), rotary=rotary)
    with pytest.raises(FacliError, match="with the rotary angles"):
        store.attend(0, q, k, k, torch.tensor([0]))
    chunk = torch.randn(BATCH, 2, KV_HEADS, HEAD_DIM)
    with pytest.raises(FacliError, match="single-token decode steps"):
        store.attend(0, torch.randn(BATCH, 2, Q_HEADS, HEAD_DIM), chunk, chunk, torch.tensor([0]),
                     rotary=rotary)


@requires_cuda
@pytest.mark.parametrize("pack", [False, True], ids=["unpacked", "packed"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kv_dtype", [None, "fp8"])
def test_cuda_streams_and_pinned_memory(mode, kv_dtype, pack):
    steps = _steps(torch.bfloat16, "cuda")
    want = _run(_offloaded((), mode, torch.bfloat16, "cuda", kv_dtype=kv_dtype), steps)
    store = _offloaded((0, 1, 3), mode, torch.bfloat16, "cuda", kv_dtype=kv_dtype,
                       gpu_prefix_tokens=9, pack_slots=pack)
    assert store._host[1].k.is_pinned()
    got = _run(store, steps)
    torch.cuda.synchronize()
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


def test_copy_queues_are_no_ops_off_cuda():
    queues = CopyQueues(torch.device("cpu"))
    assert queues.prefetch is None and queues.mark() is None
    queues.wait([None], queues.prefetch)
    queues.host_wait(None)
    assert not host_empty((2, 3), torch.bfloat16, pin=False).is_pinned()


@requires_cuda
def test_host_empty_registers_odd_sizes():
    tensor = host_empty((3, 1001, 7), torch.float8_e4m3fn, pin=True)
    assert tensor.is_pinned() and tensor.shape == (3, 1001, 7)
    gpu = torch.ones(3, 1001, 7, device="cuda").to(torch.float8_e4m3fn)
    tensor.copy_(gpu, non_blocking=True)
    torch.cuda.synchronize()
    assert torch.all(tensor.float() == 1)
