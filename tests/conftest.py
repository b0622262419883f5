import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Commands without --model run the small random model, which is fast; the tests of the trained
# default (tests/models/test_default_model.py) remove this.
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


# Triton's interpreter before 3.7 converts one-element NumPy arrays to Python scalars, which
# NumPy 2.4 refuses; those interpreted kernel tests run with triton >= 3.7 or numpy < 2.4.
INTERPRETED_KERNEL_MODULES = ("test_kernels_decode.py", "test_kernels_gemv.py",
                              "test_kernels_prefill.py", "test_kernels_prefill_hopper.py",
                              "test_kv_store_triton.py")


def _interpreter_predates_numpy() -> bool:
    if HAS_CUDA:
        return False
    try:
        import numpy
        import triton
    except ImportError:
        return False
    version = lambda text: tuple(int(part) for part in text.split(".")[:2])  # noqa: E731
    return version(triton.__version__) < (3, 7) and version(numpy.__version__) >= (2, 4)


def pytest_collection_modifyitems(config, items):
    if not _interpreter_predates_numpy():
        return
    skip = pytest.mark.skip(reason="Triton < 3.7's interpreter fails on NumPy >= 2.4; "
                                   "install triton >= 3.7 or numpy < 2.4 for this lane")
    for item in items:
        if item.path.name in INTERPRETED_KERNEL_MODULES:
            item.add_marker(skip)
