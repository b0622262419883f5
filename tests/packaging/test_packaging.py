"""facli's folders must never stand in for another package: `import kernels` is Hugging Face's
`kernels` (which transformers imports) or nothing, never facli's kernels/ folder."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FACLI_KERNELS = REPO / "kernels"

# Prints where `import kernels` would come from (or "none"), then imports a model class, which
# makes transformers import the `kernels` package when one is installed.
PROBE = """
import importlib.util, sys
spec = importlib.util.find_spec("kernels")
print(spec.origin if spec and spec.origin else "none")
import transformers
from transformers import LlamaForCausalLM, AutoTokenizer
leaked = sorted(name for name in sys.modules if name.startswith("facli"))
print(",".join(leaked) or "no-facli")
"""


def _probe(*python_flags: str, cwd: Path) -> list[str]:
    result = subprocess.run([sys.executable, *python_flags, "-c", PROBE], cwd=cwd,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()


def _is_facli_kernels(origin: str) -> bool:
    return origin != "none" and Path(origin).resolve().is_relative_to(FACLI_KERNELS)


@pytest.mark.parametrize("where", ["elsewhere", "repo-root"])
@pytest.mark.slow
def test_import_kernels_never_finds_facli_kernels(tmp_path, where):
    """From any folder, with the working folder kept off sys.path (`-P`, as the console script
    and the tests run facli), `import kernels` is not facli's folder and transformers imports
    its model classes without importing anything of facli."""
    origin, leaked = _probe("-P", cwd=tmp_path if where == "elsewhere" else REPO)
    assert not _is_facli_kernels(origin), origin
    assert leaked == "no-facli"


@pytest.mark.slow
def test_console_script_runs_from_the_repo_root(tmp_path):
    """The installed `facli` script keeps the working folder off sys.path, so it generates from
    the repository root, where a bare `python -m facli.cli` would import the raw kernels/ folder
    in place of the package transformers needs."""
    script = Path(sys.executable).with_name("facli")
    result = subprocess.run([str(script), "generate", "--prompt", "hi", "--max-new-tokens", "2",
                             "--device", "cpu"], cwd=REPO, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "FACLI_CACHE": str(tmp_path)})
    assert result.returncode == 0, result.stderr


def test_kernels_and_offload_live_inside_facli():
    import facli.kernels
    import facli.offload

    assert facli.kernels.__name__ == "facli.kernels"
    assert hasattr(facli.kernels, "prefill_attention")
    assert facli.offload.__name__ == "facli.offload"
    assert Path(facli.kernels.__file__).resolve().parent == FACLI_KERNELS
