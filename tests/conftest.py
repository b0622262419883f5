import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Commands without --model run the small random model, which is fast; the tests of the trained
# default (tests/test_default_model.py) remove this.
os.environ.setdefault("FACLI_MODEL", "random-demo")
# pytest-xdist runs one worker per core (pyproject's addopts): one thread each, in the workers
# and in the facli processes they start, keeps the cores from being shared twice over.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # Must be set before any @triton.jit function is defined.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    yield
