from dataclasses import replace

import pytest
import torch

from conftest import requires_cuda
from kernel_checks import (assert_within_torch_error, dequantized64, fp8_cache, oracle,
                           poison_allocations, sdpa_same_dtype)

from facli.kernels import decode_attention
from facli.kernels import decode as decode_module
from facli.kernels import e4m3 as e4m3_module
from facli.kernels.configs import (
    WAVE_FILL,
    DecodeConfig,
    decode_config,
    filled_share,
    splits_filling_waves,
)
from facli.kernels.decode import MAX_SPLITS, choose_num_splits, decode_attention_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (batch, q_len, q_heads, kv_heads, head_dim, cache_len, num_splits, dtype)
CPU_CASES = [
    (3, 1, 8, 8, 64, 300, 4, torch.float16),
    (3, 1, 8, 2, 128, 300, 3, torch.float16),
    (3, 1, 8, 1, 64, 257, 5, torch.float16),
    (2, 3, 8, 2, 64, 200, 4, torch.float32),
    (2, 1, 4, 1, 80, 130, 2, torch.float16),
    (1, 1, 4, 4, 64, 63, 1, torch.bfloat16),
]
GPU_CASES = [
    (4, 1, 32, 8, 128, 32 * 1024, None, torch.bfloat16),
    (2, 1, 32, 32, 128, 10000, None, torch.float16),
    (3, 4, 16, 2, 64, 5000, None, torch.bfloat16),
    (2, 1, 8, 1, 256, 4000, None, torch.bfloat16),
    (2, 1, 8, 8, 96, 3000, 7, torch.bfloat16),
]


def case_id(case):
    batch, q_len, hq, hkv, d, cache_len, splits, dtype = case
    return f"B{batch}-Tq{q_len}-gqa{hq // hkv}-d{d}-cache{cache_len}-splits{splits}-{str(dtype)[6:]}"


def ragged_lens(batch, q_len, cache_len, device):
    lens = [cache_len, q_len, max(q_len, cache_len // 2 + 3)][:batch] + [cache_len - 1] * batch
    return torch.tensor(lens[:batch], dtype=torch.int32, device=device)


def check_decode(case, monkeypatch, device, *, scores_scale=1.0, unified_max=None):
    poison_allocations(monkeypatch)
    batch, q_len, q_heads, kv_heads, head_dim, cache_len, splits, dtype = case
    if device == "cuda" and dtype == torch.float32:
        dtype = torch.float16  # float32 is the CPU lane's dtype
    q = (torch.randn(batch, q_len, q_heads, head_dim, device=device) * scores_scale).to(dtype)
    k = torch.randn(batch, cache_len, kv_heads, head_dim, device=device).to(dtype)
    v = torch.randn(batch, cache_len, kv_heads, head_dim, device=device).to(dtype)
    lens = ragged_lens(batch, q_len, cache_len, device)
    flags = torch.full((batch * kv_heads * MAX_SPLITS,), -1, dtype=torch.int32, device=device)
    out, lse = decode_attention_triton(q, k, v, lens, return_lse=True, num_splits=splits,
                                       unified_max=unified_max, fallback_out=flags)
    offsets = lens.long() - q_len
    ref, ref_lse = oracle(q, k, v, causal=True, q_offset=offsets, key_lens=lens.long(),
                          device=device if device == "cuda" else "cpu")
    base_dtype = torch.float32 if dtype == torch.bfloat16 and device == "cpu" else dtype
    base = sdpa_same_dtype(q.to(base_dtype), k.to(base_dtype), v.to(base_dtype), causal=True,
                           q_offset=offsets, key_lens=lens).to(dtype)
    assert out.shape == q.shape and out.dtype == dtype
    assert_within_torch_error(out.cpu(), ref, base.cpu())
    torch.testing.assert_close(lse.cpu().double(), ref_lse, atol=1e-4 * max(1.0, scores_scale),
                               rtol=1e-5)
    return flags


@pytest.mark.parametrize("case", CPU_CASES, ids=case_id)
@pytest.mark.slow
def test_decode_matches_float64_and_sdpa(case, monkeypatch):
    check_decode(case, monkeypatch, DEVICE)


@requires_cuda
@pytest.mark.parametrize("case", GPU_CASES, ids=case_id)
def test_decode_gpu(case, monkeypatch):
    check_decode(case, monkeypatch, "cuda")


def test_splits_share_the_written_keys_of_a_larger_cache(monkeypatch):
    """A graph replays one split count for any length: in a cache of 4096 rows holding 700 and
    129 keys, 16 splits each take a share of those keys (not of the 4096 rows)."""
    poison_allocations(monkeypatch)
    q = torch.randn(2, 1, 8, 64, device=DEVICE).to(torch.float16)
    k, v = (torch.randn(2, 4096, 2, 64, device=DEVICE).to(torch.float16) for _ in range(2))
    lens = torch.tensor([700, 129], dtype=torch.int32, device=DEVICE)
    out, lse = decode_attention_triton(q, k, v, lens, return_lse=True, num_splits=16)
    ref, ref_lse = oracle(q, k, v, causal=True, q_offset=lens.long() - 1, key_lens=lens.long(),
                          device=DEVICE if DEVICE == "cuda" else "cpu")
    base = sdpa_same_dtype(q, k, v, causal=True, q_offset=lens.long() - 1, key_lens=lens)
    assert_within_torch_error(out.cpu(), ref, base.cpu())
    torch.testing.assert_close(lse.cpu().double(), ref_lse, atol=1e-4, rtol=1e-5)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_fallback_fires_and_stays_exact(monkeypatch):
    """Scores far from the sink score leave the unified-max window: the exact path takes over."""
    case = (2, 2, 8, 2, 64, 200, 4, torch.bfloat16)
    flags = check_decode(case, monkeypatch, DEVICE, scores_scale=60.0)
    assert (flags[: 2 * 2 * 4] == 1).any()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_given_unified_max_far_off_still_exact(monkeypatch):
    case = (2, 1, 4, 2, 64, 150, 3, torch.bfloat16)
    phi = torch.tensor([0.0, 500.0, -500.0, 3.0], device=DEVICE)
    flags = check_decode(case, monkeypatch, DEVICE, unified_max=phi)
    used = flags[: 2 * 2 * 3].view(2, 2, 3)
    assert (used[:, 0] == 1).any()  # kv head 0 holds the heads with phi = 500


def test_sink_phi_needs_no_fallback_on_typical_scores(monkeypatch):
    flags = check_decode((2, 1, 8, 2, 64, 300, 4, torch.bfloat16), monkeypatch, DEVICE)
    assert (flags[: 2 * 2 * 4] == 0).all() and (flags[2 * 2 * 4:] == -1).all()


def hopper_decode_config(monkeypatch, head_dim=128):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(decode_module, "num_sms", lambda device: 132)
    return decode_config(torch.device("cuda"), head_dim)


@pytest.mark.parametrize("cache_len, kv_heads, expected", [
    (32 * 1024, 8, 16),   # one program per SM: two (33 splits of 64-key tiles) measured 5% slower
    (32 * 1024, 32, 4),
    (256 * 1024, 8, 16),
    (256 * 1024, 32, 4),  # not 12 splits of 64-key tiles (a part-filled second wave: 9% slower)
])
def test_split_counts_measured_best_on_h200(monkeypatch, cache_len, kv_heads, expected):
    cfg = hopper_decode_config(monkeypatch)
    assert (cfg.block_n, cfg.programs_per_sm) == (128, 1)
    assert choose_num_splits(1, kv_heads, cache_len, None, cfg) == expected


@pytest.mark.parametrize("cache_len, kv_heads, expected", [
    (32 * 1024, 8, 33),   # two programs per SM: 12% faster than one at 32K even with 16 tiles
    (32 * 1024, 32, 8),
    (256 * 1024, 8, 33),
    (256 * 1024, 32, 8),
    (2048, 8, 8),         # too short for a wave of 4-tile splits
])
def test_fp8_split_counts_measured_best_on_h200(monkeypatch, cache_len, kv_heads, expected):
    hopper_decode_config(monkeypatch)
    cfg = decode_config(torch.device("cuda"), 128, fp8=True)
    assert (cfg.block_n, cfg.programs_per_sm) == (64, 2)
    assert choose_num_splits(1, kv_heads, cache_len, None, cfg) == expected


@pytest.mark.parametrize("per_sm", [1, 2, 4])
@pytest.mark.parametrize("batch, kv_heads, cache_len", [
    (1, 8, 100), (1, 8, 5000), (3, 8, 300_000), (16, 8, 32 * 1024), (64, 8, 1 << 20), (1, 1, 1 << 20),
])
def test_split_counts_fill_one_wave_with_whole_tiles(monkeypatch, per_sm, batch, kv_heads, cache_len):
    monkeypatch.setattr(decode_module, "num_sms", lambda device: 132)
    cfg = DecodeConfig(block_n=64, num_warps=4, num_stages=3, programs_per_sm=per_sm)
    splits = choose_num_splits(batch, kv_heads, cache_len, None, cfg)
    assert 1 <= splits <= MAX_SPLITS
    if 2 * batch * kv_heads <= per_sm * 132:  # more programs than half a wave: next test
        assert splits == 1 or batch * kv_heads * splits <= per_sm * 132
    assert splits <= -(-cache_len // (4 * 64))  # at least 4 tiles of 64 keys, rounding up
    two_per_sm = choose_num_splits(batch, kv_heads, cache_len, None, replace(cfg, programs_per_sm=2))
    if per_sm == 4 and cache_len < two_per_sm * 32 * 64:  # short splits: fewer programs per SM
        assert splits <= two_per_sm


@pytest.mark.parametrize("rows, per_sm, expected", [
    (5, 1, 4),    # 160 programs on 132 slots: 4 splits fill 640 of 660 (measured best, H200)
    (7, 1, 4),    # 224: one split leaves the second wave 70% idle
    (8, 1, 1),    # 256 of 264 already
    (13, 1, 4),   # 1664 of 1716
    (24, 1, 1),   # 768 of 792
    (5, 2, 8),    # fp8's two programs per SM: 160 of 264 in one wave, 1280 of 1320 in five
    (7, 2, 7),
    (13, 2, 5),   # 2080 of 2112
    (48, 1, 1),
])
def test_rows_beyond_half_a_wave_take_the_fewest_splits_that_fill_their_waves(
        monkeypatch, rows, per_sm, expected):
    monkeypatch.setattr(decode_module, "num_sms", lambda device: 132)
    cfg = DecodeConfig(block_n=64, num_warps=4, num_stages=3, programs_per_sm=per_sm)
    splits = choose_num_splits(rows, 32, 32 * 1024, None, cfg)
    assert splits == expected
    total = rows * 32 * splits
    assert total / (-(-total // (per_sm * 132)) * per_sm * 132) >= WAVE_FILL
    # Short caches keep at least 4 tiles per split.
    assert choose_num_splits(rows, 32, 512, None, cfg) <= 2


def test_rows_that_no_split_count_fills_take_the_fullest():
    # 100 programs on 128 slots: 1 -> 78%, 2 -> 78%, 3 -> 78%, 4 -> 78%, 5 -> 98%; capped at 3.
    assert splits_filling_waves(100, 128, 3) == 1
    assert splits_filling_waves(100, 128, 8) == 5
    assert splits_filling_waves(150, 128, 2) == 2  # 300 of 384 beats 150 of 256
    assert filled_share(224, 132) == pytest.approx(224 / 264)
    assert splits_filling_waves(768, 264, 8, least=4) == 4  # 3072 of 3168
    assert splits_filling_waves(224, 264, 2, least=4) == 2  # short caches cap the least


@pytest.mark.parametrize("rows, expected", [(5, 8), (7, 7), (13, 5), (16, 4), (24, 4), (48, 4)])
def test_fp8_rows_take_at_least_quarter_row_splits_on_hopper(monkeypatch, rows, expected):
    """Measured best or within 2% on an H200 at 16K and 32K, full and ragged rows."""
    hopper_decode_config(monkeypatch)
    cfg = decode_config(torch.device("cuda"), 128, fp8=True)
    assert cfg.least_row_splits == 4
    assert choose_num_splits(rows, 32, 32 * 1024, None, cfg) == expected
    bf16 = decode_config(torch.device("cuda"), 128)
    assert choose_num_splits(48, 32, 32 * 1024, None, bf16) == 1  # full waves: one split each


@pytest.mark.parametrize("fp8, expected", [(True, 8), (False, 4)])
def test_rows_within_half_a_wave_take_fuller_waves_than_one_even_share(monkeypatch, fp8, expected):
    """3 rows of 32 KV heads on an H200: one wave's even share (2 fp8 splits, 1 bf16) fills 73%
    of it; 8 fp8 splits (97% of three waves) measured 2.7 ms at 256K against 3.8 ms for 2."""
    hopper_decode_config(monkeypatch)
    cfg = decode_config(torch.device("cuda"), 128, fp8=fp8)
    assert choose_num_splits(3, 32, 256 * 1024, None, cfg) == expected
    # One sequence of 32 heads already fills its wave: 8 fp8 splits (256 of 264), 4 bf16.
    assert choose_num_splits(1, 32, 256 * 1024, None, cfg) == (8 if fp8 else 4)


@pytest.mark.parametrize("capability", [(9, 0), (8, 0), (8, 9), (7, 0)])
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("rows", [1, 3, 5, 7, 13, 24])
def test_the_time_models_wave_fill_is_the_kernels(monkeypatch, capability, fp8, rows):
    """planner.time_model's wave fill is the fill at the split count the kernel chooses (a
    choice within one wave counts as full)."""
    from dataclasses import replace as replace_spec

    from facli.planner.hardware import load_hardware
    from facli.planner.time_model import Layout, decode_wave_fill
    from facli.models.recipe_loader import load_model_recipe

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(decode_module, "num_sms", lambda device: 132)
    cfg = decode_config(torch.device("cuda"), 128, fp8=fp8)
    splits = choose_num_splits(rows, 32, 32 * 1024, None, cfg)
    slots = cfg.programs_per_sm * 132
    expected = 1.0 if rows * 32 * splits <= slots else filled_share(rows * 32 * splits, slots)
    h200 = load_hardware("1xH200-141GB")
    gpu = replace_spec(h200.devices[0], sms=132, compute_capability=capability)
    hardware = replace_spec(h200, devices=(gpu,))
    layout = Layout(load_model_recipe("llama-7b").config, 32768, rows, 1, 4096, 4096, 0,
                    "resident", 2, 1 if fp8 else 2)
    assert decode_wave_fill(hardware, layout) == pytest.approx(expected)


@pytest.mark.parametrize("head_dim", [64, 80, 96, 128, 256])
def test_hopper_decode_stages_fit_shared_memory(monkeypatch, head_dim):
    cfg = hopper_decode_config(monkeypatch, head_dim)
    padded = max(64, 1 << (head_dim - 1).bit_length())
    assert cfg.num_stages * cfg.block_n * padded * 2 * 2 <= 227 * 1024


@pytest.mark.parametrize("head_dim", [64, 80, 96, 128, 256])
def test_hopper_fp8_decode_programs_fit_shared_memory(monkeypatch, head_dim):
    """programs_per_sm programs, each with its e4m3 K and V stages, the converted operands and
    scratch: (2 * stages + 3) * block_n * D bytes + 12 KiB covers what Triton 3.6 allocates for
    sm90 (74752 bytes at D=128 with 3 stages of 64 keys, 82432 at D=256 with 3 of 32)."""
    hopper_decode_config(monkeypatch, head_dim)
    cfg = decode_config(torch.device("cuda"), head_dim, fp8=True)
    padded = max(64, 1 << (head_dim - 1).bit_length())
    per_program = (2 * cfg.num_stages + 3) * cfg.block_n * padded + 12 * 1024
    assert cfg.programs_per_sm * per_program <= 227 * 1024


def test_public_decode_dispatch(monkeypatch):
    poison_allocations(monkeypatch)
    q = torch.randn(2, 1, 4, 64, device=DEVICE, dtype=torch.float16)
    k = torch.randn(2, 100, 1, 64, device=DEVICE, dtype=torch.float16)
    v = torch.randn_like(k)
    lens = torch.tensor([100, 40], dtype=torch.int32, device=DEVICE)
    out = decode_attention(q, k, v, lens, backend="triton")
    ref = decode_attention(q.double(), k.double(), v.double(), lens, backend="reference")
    torch.testing.assert_close(out.double(), ref, atol=2e-3, rtol=2e-3)


@requires_cuda
@pytest.mark.slow
def test_decode_256k(monkeypatch):
    check_decode((1, 1, 32, 8, 128, 256 * 1024, None, torch.bfloat16), monkeypatch, "cuda")


FP8_CASES = {
    "gqa4-T1-ragged": (2, 1, 8, 2, 64, 300, torch.float32),
    "mha-T3-fp16": (1, 3, 4, 4, 128, 129, torch.float16),
}
FP8_GPU_CASES = {
    "gqa4-bf16-40k": (2, 1, 32, 8, 128, 40000, torch.bfloat16),
    "gqa4-fp16-5k": (2, 1, 32, 8, 128, 5000, torch.float16),
    "gqa8-d64-T2-bf16": (3, 2, 16, 2, 64, 3000, torch.bfloat16),
    "d256-bf16": (1, 1, 8, 2, 256, 2000, torch.bfloat16),
}


def check_fp8_decode(case, device, *, scores_scale=1.0, head_major_scales=False):
    """The kernel on e4m3 K/V with scales against attention over the dequantized cache in
    float64, within twice the error PyTorch makes on that cache in q's dtype. Returns the
    fallback flags. head_major_scales: scales [B, T, Hkv] stored [B, Hkv, T], as a GPU KV
    store holds them."""
    batch, q_len, q_heads, kv_heads, head_dim, cache_len, dtype = case
    if device == "cuda" and dtype == torch.float32:
        dtype = torch.float16  # float32 is the CPU lane's dtype
    k8, k_scales = fp8_cache(batch, cache_len, kv_heads, head_dim, device)
    v8, v_scales = fp8_cache(batch, cache_len, kv_heads, head_dim, device)
    if head_major_scales:
        k_scales, v_scales = (s.transpose(1, 2).contiguous().transpose(1, 2)
                              for s in (k_scales, v_scales))
    q = (torch.randn(batch, q_len, q_heads, head_dim, device=device) * scores_scale).to(dtype)
    lens = ragged_lens(batch, q_len, cache_len, device)
    k_deq, v_deq = dequantized64(k8, k_scales), dequantized64(v8, v_scales)
    expected = decode_attention(q.double(), k_deq, v_deq, lens, backend="reference")
    same_dtype = decode_attention(q, k_deq.to(dtype), v_deq.to(dtype), lens, backend="reference")
    flags = torch.full((batch * kv_heads * MAX_SPLITS,), -1, dtype=torch.int32, device=device)
    out = decode_attention_triton(q, k8, v8, lens, k_scales=k_scales, v_scales=v_scales,
                                  fallback_out=flags)
    assert not out.isnan().any()
    error = (out.double() - expected).norm() / expected.norm()
    torch_error = (same_dtype.double() - expected).norm() / expected.norm()
    assert error <= 2 * torch_error + 1e-6, (error, torch_error)
    return flags


@pytest.mark.parametrize("case", list(FP8_CASES.values()), ids=list(FP8_CASES))
def test_decode_reads_fp8_cache_with_scales(case, monkeypatch):
    poison_allocations(monkeypatch)
    check_fp8_decode(case, DEVICE)


@pytest.mark.parametrize("case", list(FP8_CASES.values()), ids=list(FP8_CASES))
def test_decode_reads_fp8_scales_stored_by_head(case, monkeypatch):
    poison_allocations(monkeypatch)
    check_fp8_decode(case, DEVICE, head_major_scales=True)


@requires_cuda
@pytest.mark.parametrize("head_major_scales", [False, True], ids=["by-position", "by-head"])
@pytest.mark.parametrize("case", list(FP8_GPU_CASES.values()), ids=list(FP8_GPU_CASES))
def test_decode_reads_fp8_cache_gpu(case, head_major_scales, monkeypatch):
    poison_allocations(monkeypatch)
    check_fp8_decode(case, "cuda", head_major_scales=head_major_scales)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.slow
def test_fp8_fallback_fires_and_stays_exact(monkeypatch):
    """The exact path of an fp8 cache converts its tiles as the asynchronous one does."""
    poison_allocations(monkeypatch)
    flags = check_fp8_decode((2, 1, 8, 2, 64, 3000, torch.bfloat16), DEVICE, scores_scale=200.0)
    assert (flags[flags >= 0] == 1).any()


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_e4m3_conversion_exact_for_every_code(dtype):
    """The kernel's own byte conversion against PyTorch's, for all 254 finite e4m3 codes."""
    import triton
    import triton.language as tl

    @triton.jit
    def convert(X, Y, DTYPE: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(Y + offs, e4m3_module.from_e4m3(tl.load(X + offs), DTYPE, True))

    codes = torch.arange(256, dtype=torch.uint8, device="cuda").repeat(4)
    finite = (codes & 0x7F) != 0x7F  # 0x7F and 0xFF are NaN; a quantized cache never holds them
    out = torch.empty(codes.shape, dtype=dtype, device="cuda")
    convert[(1,)](codes, out, tl.bfloat16 if dtype == torch.bfloat16 else tl.float16, 1024)
    expected = codes.view(torch.float8_e4m3fn).to(dtype)
    assert torch.equal(out[finite].view(torch.int16), expected[finite].view(torch.int16))


def test_decode_fp8_needs_both_scales():
    k8 = torch.zeros(1, 8, 1, 64, device=DEVICE).to(torch.float8_e4m3fn)
    q = torch.zeros(1, 1, 1, 64, device=DEVICE)
    lens = torch.full((1,), 8, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="both k_scales and v_scales"):
        decode_attention_triton(q, k8, k8, lens, k_scales=torch.ones(1, 8, 1, device=DEVICE))
