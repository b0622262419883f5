"""facli's cache folder: where the demo model and converted GGUF models are written once."""

import os
import tempfile
from pathlib import Path

from facli.errors import FacliError


def cache_dir() -> Path:
    """$FACLI_CACHE, else $XDG_CACHE_HOME/facli, else ~/.cache/facli."""
    if os.environ.get("FACLI_CACHE"):
        return Path(os.environ["FACLI_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "facli"


def cache_setting() -> tuple[str, str]:
    """(the setting that chose the cache folder, what to do about it), for messages."""
    if os.environ.get("FACLI_CACHE"):
        return "FACLI_CACHE", "point FACLI_CACHE at a folder facli can write, or unset it"
    if os.environ.get("XDG_CACHE_HOME"):
        return "XDG_CACHE_HOME", "set FACLI_CACHE to a folder facli can write"
    return "the default cache folder", "set FACLI_CACHE to a folder facli can write"


def staging_dir(folder: Path, prefix: str, purpose: str) -> Path:
    """A fresh temp dir in `folder` (made with it if need be), for something built there and
    then renamed into place; a folder that cannot hold one is one FacliError naming the setting
    behind it, and `purpose` says what the cache is for."""
    setting, fix = cache_setting()
    for above in (folder, *folder.parents):
        if above.exists() and not above.is_dir():
            which = "which is" if above == folder else f"and {above} is"
            kind = "a file" if above.is_file() else "not a folder"
            raise FacliError(f"expected {setting} to name a folder, got {folder}, {which} {kind}; "
                             f"{fix} ({purpose})")
        if above.exists():
            break
    try:
        folder.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{prefix}-", dir=folder))
    except OSError as exc:
        raise FacliError(f"expected {setting} to name a folder facli can write, got {folder}: "
                         f"{exc.strerror or exc}; {fix} ({purpose})") from None
