"""Parsing and printing of sizes: context lengths (`32k`) and byte counts."""

import re

from facli.errors import FacliError

_CTX_PATTERN = re.compile(r"^\s*(\d+)\s*([kKmM]?)\s*$")
_CTX_MULTIPLIER = {"": 1, "k": 1024, "m": 1024 * 1024}


def parse_ctx(text: str | int) -> int:
    """`4096` -> 4096, `32k` -> 32768, `256k` -> 262144, `1m` -> 1048576 (k = 1024)."""
    if isinstance(text, int):
        value = text
    else:
        match = _CTX_PATTERN.match(str(text))
        if match is None:
            raise FacliError(
                f"expected a context length such as 4096, 32k, 256k or 1m, got {text!r}"
            )
        value = int(match.group(1)) * _CTX_MULTIPLIER[match.group(2).lower()]
    if value <= 0:
        raise FacliError(f"expected a positive context length such as 4096 or 32k, got {text!r}")
    return value


def parse_batch(text: str) -> int | None:
    """`--batch`: `8` -> 8, `auto` -> None (as many rows as keep the cache on the devices)."""
    if text == "auto":
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise FacliError(f"expected --batch a number >= 1 or auto, got {text!r}")
    return value


def format_ctx(tokens: int) -> str:
    """262144 -> '256k'; lengths that are not whole multiples of 1024 print as numbers."""
    if tokens % (1024 * 1024) == 0:
        return f"{tokens // (1024 * 1024)}m"
    if tokens % 1024 == 0:
        return f"{tokens // 1024}k"
    return str(tokens)


def format_seconds(value: float) -> str:
    """0.04 -> '40 ms', 12.3 -> '12.3 s', 600 -> '10.0 min'."""
    if value < 1:
        return f"{value * 1000:.0f} ms"
    if value < 120:
        return f"{value:.1f} s"
    return f"{value / 60:.1f} min"


def format_bytes(num_bytes: float) -> str:
    """Binary units: 1536 -> '1.5 KiB'."""
    value = float(num_bytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


GIB = 1024**3
