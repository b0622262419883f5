"""The results file: one JSON line per document, appended and fsynced as each one finishes.

Each record goes out in a single `write` on a file opened with O_APPEND, followed by `fsync`, so a
crash leaves at most one partial last line; reading detects it and the writer cuts it off before
appending. A file with any other line is not summarize's and is refused untouched: appending to
it, or cutting its last line, would change a file the user made for something else. Rewrites
(dropping failed records for --retry-failed) go to a temporary file that replaces the output
atomically. A lock file beside the output keeps two runs from writing it; it is removed when the
run ends, and folders made for an output that never got a record are removed too.
"""

import errno
import fcntl
import json
import os
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from facli.errors import FacliError
from facli.summarize.files import (
    RESULTS_LIMIT,
    NotRegularError,
    TooLargeError,
    check_output_path,
    kind_of,
    open_regular,
    read_regular,
)
from facli.units import format_bytes

RECORD_FIELDS = ("id", "source", "summary", "prompt_tokens", "generated_tokens", "seconds",
                 "status", "error")
STATUSES = ("ok", "failed")
RECORD_START = b'{"id": '  # how every record written here begins (make_record's first field)
LOCK_ATTEMPTS = 5  # a lock file removed by the run that held it is made again, this many times


@dataclass
class ExistingResults:
    """What a previous run left: the last record per id, and the byte length of the complete lines."""

    records: dict[str, dict] = field(default_factory=dict)
    complete_bytes: int = 0
    partial_bytes: int = 0  # a record cut short by a crash, after the complete lines
    unterminated: bool = False  # the last line is a whole record without its newline

    def ids_with_status(self, status: str) -> set[str]:
        return {doc_id for doc_id, record in self.records.items() if record.get("status") == status}


def read_results(path: Path) -> ExistingResults:
    """Parse the output file. A last line without its newline is a record cut short by a crash
    (ignored, and cut by ResultWriter.repair) or a whole record (kept). Raises FacliError for a
    file that is not summarize's results, or larger than RESULTS_LIMIT."""
    path = Path(path)
    if not path.exists():
        return ExistingResults()
    try:
        handle, _ = open_regular(path, RESULTS_LIMIT)
    except TooLargeError as exc:
        raise FacliError(f"expected an --out of at most {format_bytes(RESULTS_LIMIT)} to resume, "
                         f"got {path}: {exc.describe()}; choose another --out") from None
    except NotRegularError as exc:
        raise FacliError(f"expected a regular file for --out, got {path}: {exc.kind}; give a "
                         "path for a results file such as results.jsonl") from None
    except OSError as exc:
        raise FacliError(f"expected a readable --out, got {path}: {exc.strerror or exc}; "
                         "choose another path") from None
    existing = ExistingResults()
    with handle:
        for number, line in enumerate(handle, start=1):
            record, reason = parse_record(line)
            if not line.endswith(b"\n") and record is None and line.startswith(RECORD_START):
                existing.partial_bytes = len(line)
                break
            if record is None and reason is not None:
                raise _not_results(path, number, reason)
            existing.complete_bytes += len(line)
            existing.unterminated = not line.endswith(b"\n")
            if record is not None:
                existing.records[record["id"]] = record
    return existing


def parse_record(line: bytes) -> tuple[dict | None, str | None]:
    """(the record, None) for a line summarize wrote; (None, None) for a blank line; else
    (None, why the line is no record)."""
    if not line.strip():
        return None, None
    try:
        record = json.loads(line)
    except UnicodeDecodeError:
        return None, "not UTF-8"
    except json.JSONDecodeError:
        return None, "not JSON"
    if not isinstance(record, dict):
        return None, f"a JSON {type(record).__name__}, not an object"
    missing = [name for name in RECORD_FIELDS if name not in record]
    if missing:
        return None, f"a JSON object without the field{'s' if len(missing) > 1 else ''} {', '.join(missing)}"
    if not isinstance(record["id"], str) or record["status"] not in STATUSES:
        return None, 'a JSON object whose "id" is no string or whose "status" is neither ok nor failed'
    return record, None


def _not_results(path: Path, number: int, reason: str) -> FacliError:
    return FacliError(f"expected --out to be a results file of facli summarize (a JSON object "
                      f"per line with {', '.join(RECORD_FIELDS)}), got {path} whose line "
                      f"{number} is {reason}; choose another --out (summarize appends only to "
                      "its own results)")


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
    leaves no empty output behind; before_first_write() (the run's manifest) runs just before
    the output first changes."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.before_first_write: Callable[[], None] | None = None
        self.written = False
        self._opened: int | None = None
        self._folders: list[Path] = []  # made for the output: removed if it gets no record
        try:
            self._folders = _make_folders(self.path.parent)
            self._lock = _acquire_lock(lock_path(self.path))
        except BaseException as exc:
            _remove_folders(self._folders)
            if isinstance(exc, OSError):
                raise _not_writable(self.path, exc) from None
            raise

    @property
    def _fd(self) -> int:
        if self._opened is None:
            self._first_write()
            self._opened = _open_output(self.path, os.O_CREAT)
        return self._opened

    def _first_write(self) -> None:
        if not self.written and self.before_first_write is not None:
            self.before_first_write()
        self.written = True

    def repair(self, existing: ExistingResults) -> None:
        """Cut off a partial last line, or end a whole last record with its newline, so that
        the next record starts on a line of its own."""
        if existing.partial_bytes:
            os.ftruncate(self._fd, existing.complete_bytes)
            os.fsync(self._fd)
            print(f"facli: dropped a partial last line ({existing.partial_bytes} bytes) from "
                  f"{self.path}", file=sys.stderr)
        elif existing.unterminated:
            self._write(b"\n")

    def drop(self, ids: set[str]) -> None:
        """Rewrite the output without the records of `ids` (atomically: temp file, then rename)."""
        lines = read_regular(self.path, RESULTS_LIMIT).splitlines(keepends=True)
        kept = [line for line in lines if (parse_record(line)[0] or {}).get("id") not in ids]
        self._first_write()
        write_atomic(self.path, b"".join(kept))
        if self._opened is not None:
            os.close(self._opened)
        self._opened = _open_output(self.path, 0)

    def append(self, record: dict) -> None:
        self._write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]
        os.fsync(self._fd)

    def close(self) -> None:
        if self._opened is not None:
            os.close(self._opened)
            self._opened = None
        _release_lock(lock_path(self.path), self._lock)
        if not self.written:
            _remove_folders(self._folders)

    def __enter__(self) -> "ResultWriter":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _open_output(path: Path, create: int) -> int:
    """The output for appending; O_NONBLOCK so that a path swapped for a pipe fails the check
    below instead of blocking."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_NONBLOCK | os.O_CLOEXEC | create, 0o644)
    except OSError as exc:
        raise _not_writable(path, exc) from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise FacliError(f"expected a regular file for --out, got {path}: {kind_of(mode)}; give "
                         "a path for a results file such as results.jsonl")
    return fd


def check_writable(path: Path) -> None:
    """Fail before any work when `path` cannot become the output: no regular file
    (files.check_output_path), or a file or first existing folder above it that this process
    may not write. Creates nothing."""
    path = Path(path)
    check_output_path(path)
    target = path if path.exists() else next(p for p in path.absolute().parents if p.exists())
    if not target.is_dir() and target != path:
        raise _not_writable(path, NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR)))
    if not os.access(target, os.W_OK):
        raise _not_writable(path, PermissionError(errno.EACCES, os.strerror(errno.EACCES)))


def _not_writable(path: Path, exc: OSError) -> FacliError:
    return FacliError(f"expected a writable --out file, got {path}: {exc.strerror or exc}; "
                      "choose another path")


def _make_folders(folder: Path) -> list[Path]:
    """mkdir -p; the folders it made, outermost first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    for made in reversed(missing):
        made.mkdir(exist_ok=True)
    return list(reversed(missing))


def _remove_folders(folders: list[Path]) -> None:
    for folder in reversed(folders):
        try:
            folder.rmdir()
        except OSError:
            return  # not empty: something else lives there now


def lock_path(output: Path) -> Path:
    return output.with_name(output.name + ".lock")


def _acquire_lock(path: Path) -> int:
    """An exclusive flock on the lock file, which must still be the file at `path` once locked:
    a run that ends removes its lock file, and another may have opened it just before."""
    for _ in range(LOCK_ATTEMPTS):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
        try:
            mode = os.fstat(fd).st_mode
            if not stat.S_ISREG(mode):
                raise FacliError(f"expected {path} to be the lock file of facli summarize, got "
                                 f"{kind_of(mode)}; remove it or choose another --out")
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise FacliError(
                f"expected no other run writing {path.with_suffix('')}, found one holding {path}; "
                "wait for it to finish or choose another --out"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        if _same_file(path, fd):
            return fd
        os.close(fd)
    raise FacliError(f"expected to lock {path}, got it replaced {LOCK_ATTEMPTS} times while "
                     "locking; is another run starting on this --out?")


def _release_lock(path: Path, fd: int) -> None:
    """Remove the lock file while it is still held, then let go of it."""
    try:
        if _same_file(path, fd):
            path.unlink()
    finally:
        os.close(fd)


def _same_file(path: Path, fd: int) -> bool:
    try:
        there, held = os.stat(path), os.fstat(fd)
    except FileNotFoundError:
        return False
    return (there.st_dev, there.st_ino) == (held.st_dev, held.st_ino)


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data` so that a crash leaves either the old or the new file."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    fd = os.open(temporary, flags, 0o644)
    with os.fdopen(fd, "wb") as handle:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise FacliError(f"expected {temporary} to be a temporary file of facli, got "
                             f"{kind_of(os.fstat(fd).st_mode)}; remove it")
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
