"""facli where the triton package is not installed (it is published for Linux only): the whole
CPU path imports and runs, and asking for a Triton kernel says so in one line.

Every Python process started here imports a sitecustomize that makes `import triton` fail as
it does where the package is missing, so gloo ranks started by facli lack it too.
"""

import json
import os
import subprocess
import sys

import pytest
from conftest import requires_cuda
from typer.testing import CliRunner

from facli.cli import app
from facli.kernels.common import NO_TRITON

FACLI = [sys.executable, "-P", "-m", "facli.cli"]  # -P: the repo root stays off sys.path

HIDE_TRITON = '''
import importlib.abc
import sys


class _NoTriton(importlib.abc.MetaPathFinder):
    """`import triton` (and any triton.*) fails as where the package is not installed."""

    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, _NoTriton())
'''

# Modules that import triton at their top: the @triton.jit kernels and their launchers.
TRITON_MODULES = {f"facli.kernels.{name}" for name in (
    "decode", "e4m3", "prefill", "prefill_hopper", "fp8_kv", "elementwise_triton", "gemv_triton",
    "token_store", "prefill_hopper_fp8")}

# Runs in one process without Triton: imports every facli module, runs the CLI's plan-memory
# through typer's CliRunner, then each kernel entry point that needs Triton on a CPU; prints
# one JSON object.
DRIVER = '''
import importlib, json, os, pkgutil, sys

try:
    import triton  # noqa: F401
    hidden = False
except ModuleNotFoundError:
    hidden = True

import facli, facli.kernels, facli.offload

missing = {}
for package in (facli, facli.kernels, facli.offload):
    for module in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        try:
            importlib.import_module(module.name)
        except ModuleNotFoundError as exc:
            missing[module.name] = exc.name

import torch
from typer.testing import CliRunner

from facli.cli import app
from facli.errors import FacliError
from facli.kernels import decode_attention, elementwise, prefill_attention

plan = CliRunner().invoke(app, ["plan-memory", "--model", "llama-7b", "--ctx", "32k",
                                "--hardware", "1xH100-80GB", "--json"])
q, kv = torch.randn(1, 3, 4, 64), torch.randn(1, 5, 2, 64)
os.environ["TRITON_INTERPRET"] = "1"  # the one way a CPU tensor asks for Triton kernels
calls = {
    "prefill_attention": lambda: prefill_attention(q, kv, kv, backend="triton"),
    "decode_attention": lambda: decode_attention(q, kv, kv, torch.tensor([5]), backend="triton"),
    "pair_sum": lambda: elementwise.pair_sum(kv[0, 0], kv[0, 1]),
}
errors = {}
for name, call in calls.items():
    try:
        call()
        errors[name] = None
    except FacliError as exc:
        errors[name] = str(exc)
print(json.dumps({
    "hidden": hidden, "missing": missing, "errors": errors,
    "plan": {"code": plan.exit_code, "stdout": plan.stdout,
             "stderr": plan.stderr + repr(plan.exception)},
    "triton_loaded": any(m.split(".")[0] == "triton" for m in sys.modules)}))
'''

GENERATE = ["generate", "--prompt", "Hello there", "--max-new-tokens", "6", "--temperature", "0",
            "--device", "cpu", "--json"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    site = tmp_path_factory.mktemp("no_triton")
    (site / "sitecustomize.py").write_text(HIDE_TRITON)
    cache = tmp_path_factory.mktemp("cache")
    path = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "FACLI_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    env.pop("TRITON_INTERPRET", None)  # what a user runs: the CPU path, not the tests' lane
    return env


def run(command, env):
    # Away from the repository root, where ./facli would shadow the installed package.
    return subprocess.run(command, env=env, cwd=env["FACLI_CACHE"], capture_output=True,
                          text=True, timeout=600)


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_facli_imports_plans_and_names_what_needs_triton_without_it(env):
    result = run([sys.executable, "-P", "-c", DRIVER], env)
    assert result.returncode == 0, result.stderr
    report = last_json(result.stdout)
    assert report["hidden"], "the sitecustomize did not hide triton"
    assert not report["triton_loaded"]
    # Every module imports but the Triton ones, which fail for want of triton alone.
    assert report["missing"] == dict.fromkeys(TRITON_MODULES, "triton")
    assert report["plan"]["code"] == 0, report["plan"]["stderr"]
    plan = last_json(report["plan"]["stdout"])
    assert plan["fits"] and plan["model"] == "llama-7b" and plan["ctx"] == 32 * 1024
    assert report["errors"] == {name: NO_TRITON for name in
                                ("prefill_attention", "decode_attention", "pair_sum")}
    assert "\n" not in NO_TRITON and NO_TRITON.startswith("expected the triton package")


@pytest.mark.slow
def test_generate_without_triton_gives_the_tokens_of_a_run_with_it(env, monkeypatch):
    runs = {kv: run(FACLI + GENERATE + (["--kv-dtype", kv] if kv else []), env)
            for kv in (None, "fp8")}
    for got in runs.values():
        assert got.returncode == 0, got.stderr
    monkeypatch.setenv("FACLI_CACHE", env["FACLI_CACHE"])
    here = CliRunner().invoke(app, GENERATE)  # this process, where Triton is importable
    assert here.exit_code == 0, here.stderr
    want = last_json(here.stdout)["token_ids"]
    assert len(want) == 6
    assert last_json(runs[None].stdout)["token_ids"] == want
    assert len(last_json(runs["fp8"].stdout)["token_ids"]) == 6


@pytest.mark.slow
def test_gloo_ranks_and_bench_run_without_triton(env):
    two = run(FACLI + GENERATE + ["--devices", "2"], env)
    assert two.returncode == 0, two.stderr
    assert len(last_json(two.stdout)["token_ids"]) == 6
    bench = run(FACLI + ["bench", "--depth", "64", "--decode-tokens", "3", "--device", "cpu",
                         "--baseline", "none", "--json"], env)
    assert bench.returncode == 0, bench.stderr
    assert last_json(bench.stdout)["environment"]["triton"] is None


@pytest.mark.slow
@requires_cuda
def test_cuda_without_triton_is_one_line(env):
    result = run(FACLI + ["generate", "--prompt", "Hello there", "--max-new-tokens", "2",
                          "--device", "cuda"], env)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == f"facli: error: {NO_TRITON}"
    assert "Traceback" not in result.stderr
