"""The results file: one JSON line per document, appended and fsynced as each one finishes.

Each record goes out in a single `write` on a file opened with O_APPEND, followed by `fsync`, so a
crash leaves at most one partial last line; reading detects it and the writer cuts it off before
appending. Rewrites (dropping failed records for --retry-failed) go to a temporary file that
replaces the output atomically. A lock file beside the output keeps two runs from writing it.
"""

import errno
import fcntl
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from facli.errors import FacliError

RECORD_FIELDS = ("id", "source", "summary", "prompt_tokens", "generated_tokens", "seconds",
                 "status", "error")


@dataclass
class ExistingResults:
    """What a previous run left: the last record per id, and the byte length of the complete lines."""

    records: dict[str, dict] = field(default_factory=dict)
    complete_bytes: int = 0
    partial_bytes: int = 0
    ignored_lines: list[int] = field(default_factory=list)  # complete lines that are no record

    def ids_with_status(self, status: str) -> set[str]:
        return {doc_id for doc_id, record in self.records.items() if record.get("status") == status}


def read_results(path: Path) -> ExistingResults:
    """Parse the output file; a last line without its newline is a partial write and is ignored."""
    path = Path(path)
    if not path.exists():
        return ExistingResults()
    data = path.read_bytes()
    complete = data.rfind(b"\n") + 1
    existing = ExistingResults(complete_bytes=complete, partial_bytes=len(data) - complete)
    for number, line in enumerate(data[:complete].splitlines(), start=1):
        record = _parse_line(line)
        if record is None:
            if line.strip():
                existing.ignored_lines.append(number)
            continue
        existing.records[record["id"]] = record
    return existing


def _parse_line(line: bytes) -> dict | None:
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("id"), str):
        return None
    return record


def make_record(doc_id: str, source: str, *, summary: str | None, prompt_tokens: int,
                generated_tokens: int, seconds: float, error: str | None) -> dict:
    return {
        "id": doc_id,
        "source": source,
        "summary": summary,
        "prompt_tokens": prompt_tokens,
        "generated_tokens": generated_tokens,
        "seconds": round(seconds, 3),
        "status": "failed" if error else "ok",
        "error": error,
    }


class ResultWriter:
    """Appends records to the output; holds the output's lock until closed. The output itself
    is opened (and created) when first written, so a run that stops before its first record
    leaves no empty output behind."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._lock = _acquire_lock(lock_path(self.path))
        except OSError as exc:
            raise _not_writable(self.path, exc) from None
        self._opened: int | None = None

    @property
    def _fd(self) -> int:
        if self._opened is None:
            try:
                self._opened = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            except OSError as exc:
                raise _not_writable(self.path, exc) from None
        return self._opened

    def repair(self, existing: ExistingResults) -> None:
        """Cut off a partial last line so that the next record starts on a line of its own."""
        if existing.ignored_lines:
            lines = ", ".join(map(str, existing.ignored_lines[:5]))
            print(f"facli: ignoring line(s) {lines} of {self.path}: not result records", file=sys.stderr)
        if existing.partial_bytes:
            os.ftruncate(self._fd, existing.complete_bytes)
            os.fsync(self._fd)
            print(f"facli: dropped a partial last line ({existing.partial_bytes} bytes) from "
                  f"{self.path}", file=sys.stderr)

    def drop(self, ids: set[str]) -> None:
        """Rewrite the output without the records of `ids` (atomically: temp file, then rename)."""
        lines = self.path.read_bytes().splitlines(keepends=True)
        kept = [line for line in lines if (_parse_line(line) or {}).get("id") not in ids]
        write_atomic(self.path, b"".join(kept))
        if self._opened is not None:
            os.close(self._opened)
        self._opened = os.open(self.path, os.O_WRONLY | os.O_APPEND)

    def append(self, record: dict) -> None:
        data = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]
        os.fsync(self._fd)

    def close(self) -> None:
        if self._opened is not None:
            os.close(self._opened)
        os.close(self._lock)

    def __enter__(self) -> "ResultWriter":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def check_writable(path: Path) -> None:
    """Fail before any work when `path` cannot become the output: a folder, or a file or first
    existing folder above it that this process may not write. Creates nothing."""
    path = Path(path)
    if path.is_dir():
        raise _not_writable(path, IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR)))
    target = path if path.exists() else next(p for p in path.absolute().parents if p.exists())
    if not target.is_dir() and target != path:
        raise _not_writable(path, NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR)))
    if not os.access(target, os.W_OK):
        raise _not_writable(path, PermissionError(errno.EACCES, os.strerror(errno.EACCES)))


def _not_writable(path: Path, exc: OSError) -> FacliError:
    return FacliError(f"expected a writable --out file, got {path}: {exc.strerror or exc}; "
                      "choose another path")


def lock_path(output: Path) -> Path:
    return output.with_name(output.name + ".lock")


def _acquire_lock(path: Path) -> int:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise FacliError(
            f"expected no other run writing {path.with_suffix('')}, found one holding {path}; "
            "wait for it to finish or choose another --out"
        ) from None
    return fd


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data` so that a crash leaves either the old or the new file."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
