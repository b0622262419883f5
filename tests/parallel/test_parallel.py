"""Tensor parallelism on CPU with gloo: N ranks must equal one process, tiled or not."""

import pytest
import torch

from facli.errors import FacliError
from facli.models.checkpoint import CheckpointReader
from facli.models.config import ModelConfig
from facli.models.llama import CausalLM
from facli.offload.device_cache import DeviceKVCache
from facli.parallel import comm
from facli.parallel.context import ParallelContext, TensorParallelSettings
from facli.parallel.degrees import check_tensor_parallel, valid_degrees
from facli.parallel.launch import current_context, launch
from facli.run.batching import BatchedEngine, RowRequest
from facli.run.engine import Engine
from facli.run.sampling import Sampler, SamplingParams

MODELS = {
    # 8 query heads over 4 KV heads: 4 ranks hold one KV head and two query heads each.
    "llama-gqa-8q4kv": ("llama", dict(num_attention_heads=8, num_key_value_heads=4)),
    # MHA with q/k/v/o biases (o_proj's bias is added once, after the reduction) and tied lm_head.
    "llama-mha-bias-tied": ("llama", dict(attention_bias=True, tie_word_embeddings=True)),
}
PROMPT_LEN, PREFILL_CHUNK, TILE = 19, 8, 3  # chunks 8, 8, 3; tiles 3, 3, 2 (and untiled 3)
TILINGS = {
    "untiled": TensorParallelSettings(),
    "tile3": TensorParallelSettings(tile_tokens=TILE),
    "tile3-mlp-overlap": TensorParallelSettings(tile_tokens=TILE, overlap_mlp=True),
    # On CPU ranks the copy engines fall back to all_reduce.
    "tile3-copy": TensorParallelSettings(tile_tokens=TILE, reduce_engine="copy"),
    # Chunks of 8 run as two waves of 4 tokens, each half summed by an asynchronous all_reduce.
    "tile3-waves": TensorParallelSettings(tile_tokens=TILE, waves=True),
}
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    # Imported here: spawned ranks import this module and should not pay for transformers.
    from checkpoints import build_checkpoint

    paths = {}
    for name, (model_type, overrides) in MODELS.items():
        paths[name] = tmp_path_factory.mktemp(name)
        build_checkpoint(paths[name], model_type, **overrides)
    return paths


def _run_model(parallel: ParallelContext, directory, settings):
    """Chunked prefill logits [T, V] of a fixed prompt, greedy tokens through the engine, and
    greedy tokens of several prompts decoded together in rows (facli.run.batching)."""
    config = ModelConfig.from_dir(directory)
    parallel = parallel.with_settings(settings)
    model = CausalLM(config, dtype=torch.float32, device="cpu", parallel=parallel)
    model.load(CheckpointReader(directory))
    kv = DeviceKVCache(config.num_hidden_layers, 1, PROMPT_LEN + NEW_TOKENS,
                       config.num_key_value_heads // parallel.world_size, config.head_dim,
                       torch.float32, torch.device("cpu"))
    ids = torch.randint(0, config.vocab_size, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(7))
    logits = [model(ids[:, s:s + PREFILL_CHUNK], s, kv, all_logits=True)[0]
              for s in range(0, PROMPT_LEN, PREFILL_CHUNK)]
    engine = Engine(model, kv, prefill_chunk=PREFILL_CHUNK,
                    token_sync=lambda tokens: comm.broadcast_tokens(tokens, parallel))
    run = engine.generate(ids[0].tolist(), max_new_tokens=NEW_TOKENS, sampler=Sampler(SamplingParams(), model.device))
    return torch.cat(logits), run.token_ids, _rows_tokens(model, parallel, ids[0].tolist())


def _rows_tokens(model, parallel: ParallelContext, prompt: list[int]) -> list[list[int]]:
    """Five prompts in 4 rows: a decode step of 4 tokens is cut into tiles of TILE."""
    config = model.config
    rows = DeviceKVCache(config.num_hidden_layers, 4, PROMPT_LEN + NEW_TOKENS,
                         config.num_key_value_heads // parallel.world_size, config.head_dim,
                         torch.float32, torch.device("cpu"))
    batched = BatchedEngine(model, rows, prefill_chunk=PREFILL_CHUNK,
                            token_sync=lambda tokens: comm.broadcast_tokens(tokens, parallel))
    queue = [RowRequest(prompt[:length], 6, key=index)
             for index, length in enumerate((5, PROMPT_LEN, 11, 3, 16))]
    found = {}
    batched.run(lambda: queue.pop(0) if queue else None,
                lambda request, run: found.setdefault(request.key, run.token_ids),
                sampling=SamplingParams())
    return [found[index] for index in range(5)]


def _row_parallel_cases(parallel: ParallelContext):
    """Tiled and untiled row-parallel matmul against the full product, for odd token counts."""
    generator = torch.Generator().manual_seed(3)
    full_x = torch.randn(2, 63, 40, generator=generator)
    full_w = torch.randn(24, 40, generator=generator)
    part = 40 // parallel.world_size
    x = full_x[..., parallel.rank * part:(parallel.rank + 1) * part]
    w = full_w[:, parallel.rank * part:(parallel.rank + 1) * part]
    errors = {}
    for tokens in (1, 5, 63):
        for tile in (None, 1, 4, 7):
            tiled = parallel.with_settings(TensorParallelSettings(tile_tokens=tile))
            out = comm.row_parallel_linear(x[:, :tokens], w, tiled)
            errors[tokens, tile] = (out - full_x[:, :tokens] @ full_w.T).abs().max().item()
    return errors


def _rank_checks(parallel: ParallelContext, checkpoints):
    assert current_context() == parallel
    results = {(name, tiling): _run_model(parallel, path, settings)
               for name, path in checkpoints.items() for tiling, settings in TILINGS.items()}
    return results, _row_parallel_cases(parallel)


@pytest.fixture(scope="module")
def single(checkpoints):
    return launch(_rank_checks, (checkpoints,), world_size=1)


@pytest.fixture(scope="module", params=[2, 4], ids=["2-ranks", "4-ranks"])
def parallel(request, checkpoints):
    return request.param, launch(_rank_checks, (checkpoints,), world_size=request.param)


@pytest.mark.parametrize("tiling", list(TILINGS))
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.slow
def test_ranks_match_one_process(single, parallel, name, tiling):
    world, (results, _) = parallel
    logits, tokens, rows = results[name, tiling]
    expected_logits, expected_tokens, expected_rows = single[0][name, "untiled"]
    scale = expected_logits.abs().max().item()
    # Only the summation order differs: a few float32 roundings of the largest logit.
    assert (logits - expected_logits).abs().max().item() <= 64 * torch.finfo(torch.float32).eps * scale
    assert tokens == expected_tokens
    assert len(tokens) == NEW_TOKENS
    assert rows == expected_rows and [len(row) for row in rows] == [6] * 5


@pytest.mark.slow
def test_row_parallel_tiles_match_full_product(parallel):
    _, (_, errors) = parallel
    assert max(errors.values()) < 1e-4, errors


def test_tiling_does_not_change_one_process(single):
    for name in MODELS:
        for tiling in TILINGS:
            assert torch.equal(single[0][name, "untiled"][0], single[0][name, tiling][0])


EIGHT_RANK_TILINGS = ("untiled", "tile3", "tile3-waves")


def _eight_rank_checks(parallel: ParallelContext, directory):
    return {tiling: _run_model(parallel, directory, TILINGS[tiling]) for tiling in EIGHT_RANK_TILINGS}


@pytest.mark.slow
def test_eight_ranks_match_one_process(tmp_path):
    """The largest degree facli runs: 16 query heads over 8 KV heads, one KV head per rank, with
    one all_reduce per projection, with tiles, and in two waves (the prefill of more than two
    GPU ranks)."""
    from checkpoints import build_checkpoint

    build_checkpoint(tmp_path, "llama", hidden_size=128, num_attention_heads=16,
                     num_key_value_heads=8)
    single = launch(_eight_rank_checks, (tmp_path,), world_size=1)
    eight = launch(_eight_rank_checks, (tmp_path,), world_size=8)
    expected_logits, expected_tokens, expected_rows = single["untiled"]
    scale = expected_logits.abs().max().item()
    for tiling in EIGHT_RANK_TILINGS:
        logits, tokens, rows = eight[tiling]
        assert (logits - expected_logits).abs().max().item() <= 64 * torch.finfo(torch.float32).eps * scale
        assert tokens == expected_tokens and len(tokens) == NEW_TOKENS
        assert rows == expected_rows


def _raise_on_rank_one(parallel, kind, marker_dir):
    (marker_dir / f"rank{parallel.rank}.pid").write_text(str(__import__("os").getpid()))
    comm.barrier(parallel)
    if parallel.rank == 1:
        if kind == "user":
            raise FacliError("expected a readable prompt, got none")
        if kind == "bug":
            raise ValueError("boom")
        if kind == "exit":
            __import__("os")._exit(3)
        if kind == "hang":
            __import__("time").sleep(600)
    comm.barrier(parallel)  # rank 0 waits here for a peer that never comes
    return "unreachable"


@pytest.mark.parametrize("kind,message", [
    ("user", "rank 1 of 2: expected a readable prompt"),
    ("bug", "rank 1 of 2 failed: ValueError: boom"),
    ("exit", "rank 1 of 2 failed: ProcessExit: exited with code 3"),
    ("hang", "rank 0 of 2 failed"),
], ids=["facli-error", "exception", "process-exit", "peer-hangs"])
@pytest.mark.slow
def test_rank_failure_ends_all_ranks(tmp_path, kind, message):
    import os
    import time

    started = time.monotonic()
    with pytest.raises(FacliError, match=message):
        launch(_raise_on_rank_one, (kind, tmp_path), world_size=2, timeout_s=3)
    assert time.monotonic() - started < 30
    for rank in range(2):
        pid = int((tmp_path / f"rank{rank}.pid").read_text())
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_non_dividing_rank_count_is_a_clear_error():
    config = ModelConfig.from_dict(dict(model_type="llama", vocab_size=384, hidden_size=64,
                                        intermediate_size=160, num_hidden_layers=1,
                                        num_attention_heads=8, num_key_value_heads=4))
    check_tensor_parallel(config, 4)
    with pytest.raises(FacliError, match=r"divide the model's num_attention_heads \(8\), got 3; use --devices 1, 2, 4"):
        check_tensor_parallel(config, 3)
    with pytest.raises(FacliError, match="num_key_value_heads"):
        CausalLM(config, dtype=torch.float32, device="cpu", parallel=ParallelContext(0, 8))
    with pytest.raises(FacliError, match="at most"):
        launch(_rank_checks, ({},), world_size=2, device_type="cuda") if not torch.cuda.is_available() \
            else pytest.skip("has a GPU")


def test_valid_degrees_of_llama_7b_shapes():
    config = ModelConfig.from_dict(dict(model_type="llama", vocab_size=32000, hidden_size=4096,
                                        intermediate_size=11008, num_hidden_layers=32,
                                        num_attention_heads=32, num_key_value_heads=32))
    assert valid_degrees(config) == [1, 2, 4, 8]


TORCHRUN_SCRIPT = """
import torch
from facli.parallel import comm
from facli.parallel.launch import launch

def fn(parallel, offset):
    total = comm.all_reduce_sum(torch.tensor([parallel.rank + offset]), parallel)
    print(f"rank {parallel.rank} of {parallel.world_size}: sum {int(total)}")
    return parallel.rank

print("result", launch(fn, (1,), world_size=2))
"""


@pytest.mark.slow
def test_runs_inside_torchrun(tmp_path):
    import subprocess
    import sys

    script = tmp_path / "probe.py"
    script.write_text(TORCHRUN_SCRIPT)
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(script)], capture_output=True, text=True, timeout=120,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == "rank 0 of 2: sum 3 result 0".split()


@pytest.mark.slow
def test_generate_under_torchrun_reports_once_and_matches_one_process(tmp_path):
    import json
    import os
    import subprocess
    import sys

    # PYTHONSAFEPATH: `-m facli.cli` must not put the working folder on sys.path.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FACLI_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1",
           "PYTHONSAFEPATH": "1"}
    command = ["-m", "facli.cli", "generate", "--prompt", "tensor parallel", "--max-new-tokens", "6",
               "--device", "cpu", "--json"]
    ranks = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                            "--nproc-per-node", "2", *command, "--devices", "2"],
                           capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert ranks.returncode == 0, ranks.stderr
    one = subprocess.run([sys.executable, *command], capture_output=True, text=True, timeout=300,
                         env=env, cwd=tmp_path)
    assert one.returncode == 0, one.stderr
    lines = ranks.stdout.strip().splitlines()
    assert len(lines) == 1 and ranks.stderr.count("facli: plan:") == 1, (ranks.stdout, ranks.stderr)
    assert json.loads(lines[0])["token_ids"] == json.loads(one.stdout)["token_ids"]


@pytest.mark.parametrize("devices,peer,local_world,expected", [
    (2, True, None, True), (2, False, None, False), (1, True, None, False), (4, True, "2", False)])
def test_copy_engines_only_between_peer_gpus_of_one_host(monkeypatch, devices, peer, local_world, expected):
    from facli.parallel import copy_engine

    monkeypatch.setattr(copy_engine, "_USABLE", {})
    monkeypatch.setattr(torch.cuda, "device_count", lambda: devices)
    monkeypatch.setattr(torch.cuda, "can_device_access_peer", lambda a, b: peer)
    if local_world is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local_world)
    assert copy_engine.usable(2 if devices < 4 else 4) is expected
