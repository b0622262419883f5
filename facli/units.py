"""Parsing and printing of sizes: context lengths (`32k`) and byte counts."""

import math
import re

from facli.errors import FacliError

_CTX_PATTERN = re.compile(r"^\s*(\d+)\s*([kKmM]?)\s*$")
_CTX_MULTIPLIER = {"": 1, "k": 1024, "m": 1024 * 1024}
# The longest context facli plans for (16m tokens): far past any trained length, and the
# planner's per-chunk arrays stay small enough to build in seconds even at one token a chunk.
MAX_CTX = 1 << 24
# Larger counts (ranks, rows, tokens of a tile or chunk) mean nothing to any GPU or host.
MAX_COUNT = 1 << 31


def parse_ctx(text: str | int) -> int:
    """`4096` -> 4096, `32k` -> 32768, `256k` -> 262144, `1m` -> 1048576 (k = 1024), at most
    MAX_CTX."""
    if isinstance(text, int) and not isinstance(text, bool):
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
    if value > MAX_CTX:
        raise FacliError(f"expected a context length of at most {format_ctx(MAX_CTX)} ({MAX_CTX} "
                         f"tokens), got {text!r}; facli plans contexts up to that")
    return value


def check_count(value, option: str, *, low: int = 1, high: int = MAX_COUNT,
                optional: bool = False) -> None:
    """Raise a FacliError unless `value` is a whole number in [low, high] (or None where
    `optional`): the one check for the counts a user passes (ranks, rows, tokens)."""
    if value is None and optional:
        return
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise FacliError(f"expected {option} a whole number from {low} to {high}, got {value!r}")


def check_number(value, option: str, *, low: float, high: float = math.inf,
                 low_open: bool = False, note: str = "") -> None:
    """Raise a FacliError unless `value` is a finite number from `low` (excluded where
    low_open) to `high`: nan and inf, which float options accept, are refused here."""
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value) and (low < value if low_open else low <= value)
          and value <= high)
    if not ok:
        span = (f"{'(' if low_open else '['}{low:g}, "
                + ("inf)" if high == math.inf else f"{high:g}]"))
        raise FacliError(f"expected {option} a finite number in {span}{note}, got {value!r}")


def parse_count(text: str, option: str) -> int | None:
    """A count option that takes auto (`--devices`, `--batch`): `4` -> 4, `auto` -> None (the
    planner chooses)."""
    if text == "auto":
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_COUNT:
        raise FacliError(f"expected {option} a number from 1 to {MAX_COUNT}, or auto, got {text!r}")
    return value


def parse_batch(text: str) -> int | None:
    """`--batch`: `8` -> 8, `auto` -> None (as many rows as keep the cache on the devices)."""
    return parse_count(text, "--batch")


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
