"""The JSON files of a checkpoint that facli reads itself: read with a bound, and their fields
checked by type and range, each mistake one line naming the file and the field."""

import json
import math
from pathlib import Path

from facli.errors import FacliError
from facli.summarize.files import read_user_file

# Sizes past int32 break the kernels' index arithmetic long before any memory would hold them.
MAX_SIZE = (1 << 31) - 1
# config.json and generation_config.json hold a few KiB; a file this large is not one of them.
JSON_LIMIT = 16 << 20
_REQUIRED = object()


def read_json_object(path: Path, limit: int = JSON_LIMIT) -> dict:
    """The JSON object in `path` (a regular file of at most `limit` bytes); anything else is one
    FacliError line naming the file."""
    fix = "re-export the checkpoint or copy the file again"
    data = read_user_file(path, limit, str(Path(path).name), fix)
    try:
        raw = json.loads(data)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and bad UTF-8 are ValueErrors
        reason = str(exc).splitlines()[0] if str(exc) else "nesting too deep"
        raise FacliError(f"expected valid JSON in {path}, got a parse error: {reason}; {fix}") from None
    if not isinstance(raw, dict):
        raise FacliError(f"expected a JSON object ({{...}}) in {path}, got {shown(raw)}; {fix}")
    return raw


def _is_whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def shown(value) -> str:
    """A value as the file has it, with its JSON kind: `'big' (a string)`, `4096.0 (a number
    with a decimal point)`, `null`."""
    if value is None:
        return "null"
    kinds = ((bool, "a boolean"), (int, "a whole number"), (float, "a number with a decimal point"),
             (str, "a string"), (list, "a list"), (dict, "an object"))
    kind = next((name for cls, name in kinds if isinstance(value, cls)), type(value).__name__)
    text = repr(value) if isinstance(value, str) else json.dumps(value, default=str)
    if len(text) > 40:
        text = text[:37] + "..."
    return f"{text} ({kind})"


class Fields:
    """Typed reads of one JSON object's fields; a mistake names the file, the field and what it
    takes. A missing field or null takes the default."""

    def __init__(self, raw: dict, source: str, prefix: str = ""):
        self.raw, self.source, self.prefix = raw, source, prefix

    def fail(self, name: str, expected: str, value) -> None:
        raise FacliError(f"expected {self.prefix}{name} in {self.source} to be {expected}, got "
                         f"{shown(value)}; correct it, or re-export the checkpoint")

    def whole(self, name: str, default=_REQUIRED, *, low: int = 1, high: int = MAX_SIZE):
        value = self.raw.get(name)
        if value is None and default is not _REQUIRED:
            return default
        if not _is_whole(value) or not low <= value <= high:
            self.fail(name, f"a whole number from {low} to {high}", value)
        return value

    def number(self, name: str, default: float | None) -> float | None:
        """A finite positive number."""
        value = self.raw.get(name)
        if value is None:
            return default
        if not _is_number(value) or value <= 0:
            self.fail(name, "a finite number > 0", value)
        return float(value)

    def flag(self, name: str, default: bool) -> bool:
        value = self.raw.get(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            self.fail(name, "true or false", value)
        return value

    def text(self, name: str) -> str | None:
        value = self.raw.get(name)
        if value is not None and not isinstance(value, str):
            self.fail(name, "a string", value)
        return value

    def table(self, name: str) -> "Fields | None":
        value = self.raw.get(name)
        if value is None:
            return None
        if not isinstance(value, dict):
            self.fail(name, "an object ({...})", value)
        return Fields(value, self.source, f"{self.prefix}{name}.")

    def token_ids(self, name: str) -> tuple[int, ...]:
        """A token id, a list of them, or null."""
        value = self.raw.get(name)
        if value is None:
            return ()
        ids = value if isinstance(value, list) else [value]
        if not all(_is_whole(v) and 0 <= v <= MAX_SIZE for v in ids):
            self.fail(name, "a token id (a whole number >= 0), a list of them, or null", value)
        return tuple(ids)
