"""Where and with what a `facli bench` run measured: the GPU's HBM rate from its hardware
recipe, device names, software versions, the facli commit and the date."""

import os
import platform
import subprocess
import time
from pathlib import Path

import torch

import facli
from facli.planner.hardware import detect_hardware


def hbm_gbps(device: torch.device) -> float | None:
    """Achievable device memory GB/s of this GPU from its hardware recipe (None on CPUs)."""
    if device.type != "cuda":
        return None
    spec = detect_hardware()
    return spec.devices[0].hbm_gbps if spec.devices else None


def environment(device: torch.device, devices: int) -> dict:
    """Device names, software versions, the facli commit and the date."""
    versions = {}
    for name in ("triton", "transformers"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = None
    gpus = [torch.cuda.get_device_name(i) for i in range(devices)] if device.type == "cuda" else []
    return {
        "device": device.type, "gpus": gpus, "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__, "cuda": torch.version.cuda, **versions,
        "python": platform.python_version(), "facli": facli.__version__, **git_commit(),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def git_commit() -> dict:
    """The commit being measured: $FACLI_COMMIT when set (a copied or installed tree), else the
    facli checkout's commit and whether it has uncommitted changes, else "unknown"."""
    if os.environ.get("FACLI_COMMIT"):
        return {"commit": os.environ["FACLI_COMMIT"], "dirty": None}
    root = Path(__file__).resolve().parents[2]  # the checkout: facli/bench/ is two below it
    if not (root / ".git").exists():  # an installed copy has no checkout of its own
        return {"commit": "unknown", "dirty": None}

    def git(*args):
        done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
        return done.stdout.strip() if done.returncode == 0 else None

    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no")) if commit else None
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    return {"commit": commit or "unknown", "dirty": dirty}
