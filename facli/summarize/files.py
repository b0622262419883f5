"""The files a user names to summarize: regular files only, and every read of one bounded.

A device, a pipe or a socket given as a document, a template or the output would read without
end (/dev/full, /dev/zero), block forever (a named pipe, /dev/stdout on a pipe) or take writes
that vanish (/dev/null), so each is refused before it is opened for reading or writing. Files
are opened with O_NONBLOCK, so that a path swapped for a pipe in the meantime fails the
regular-file check instead of blocking the open.
"""

import os
import stat
from pathlib import Path
from typing import BinaryIO

from facli.errors import FacliError
from facli.units import format_bytes

MIB = 1 << 20
GIB = 1 << 30
# Far beyond a text a real user summarizes (a 256K-token context is about 1 MiB of text), yet
# small enough to fail in a moment rather than fill the memory.
DOCUMENT_LIMIT = 64 * MIB  # a .txt or .md document
JSONL_LIMIT = 1 * GIB  # a .jsonl file of documents
TEMPLATE_LIMIT = 1 * MIB  # --prompt-template
RESULTS_LIMIT = 4 * GIB  # an existing --out, read to resume
MANIFEST_LIMIT = 64 * MIB  # the run manifest beside --out

# Kernel objects, /dev/stdout and /dev/fd/N among them: no place for results and the lock and
# manifest files written beside them. Folders below /dev (/dev/shm) hold ordinary files.
SYSTEM_FOLDERS = ("/proc", "/sys")

class NotRegularError(OSError):
    """The path names something other than a regular file (its kind in `kind`)."""

    def __init__(self, path: Path, kind: str):
        super().__init__(f"{path} is {kind}")
        self.kind = kind


class TooLargeError(OSError):
    """The file holds more than the limit."""

    def __init__(self, path: Path, size: int, limit: int):
        super().__init__(f"{path} holds {format_bytes(size)}")
        self.size, self.limit = size, limit

    def describe(self) -> str:
        return f"{format_bytes(self.size)}, over the {format_bytes(self.limit)} limit"


def kind_of(mode: int) -> str:
    """'a directory', 'a named pipe', ... for a stat mode that is not a regular file's."""
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a pipe"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
             (stat.S_ISSOCK, "a socket"))
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def open_regular(path: Path, limit: int) -> tuple[BinaryIO, int]:
    """(a binary file object, its size) for a regular file of at most `limit` bytes; raises
    NotRegularError, TooLargeError or the OSError of the open."""
    path = Path(path)
    mode = os.stat(path).st_mode  # refuse before opening: opening a device may do something
    if not stat.S_ISREG(mode):
        raise NotRegularError(path, kind_of(mode))
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        status = os.fstat(fd)
        if not stat.S_ISREG(status.st_mode):
            raise NotRegularError(path, kind_of(status.st_mode))
        if status.st_size > limit:
            raise TooLargeError(path, status.st_size, limit)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb"), status.st_size


def read_regular(path: Path, limit: int) -> bytes:
    """The bytes of a regular file of at most `limit` bytes (open_regular's errors)."""
    handle, _ = open_regular(path, limit)
    with handle:
        data = handle.read(limit + 1)  # a file that grew since the check stops at the limit
    if len(data) > limit:
        raise TooLargeError(Path(path), len(data), limit)
    return data


def read_user_file(path: Path, limit: int, what: str, fix: str) -> bytes:
    """read_regular with each failure as one FacliError line naming `what` and the `fix`."""
    try:
        return read_regular(path, limit)
    except TooLargeError as exc:
        raise FacliError(f"expected {what} of at most {format_bytes(limit)}, got {path}: "
                         f"{format_bytes(exc.size)}; {fix}") from None
    except NotRegularError as exc:
        raise FacliError(f"expected {what} to be a regular file, got {path}: {exc.kind}; "
                         f"{fix}") from None
    except OSError as exc:
        raise FacliError(f"expected a readable {what}, got {path}: {exc.strerror or exc}; "
                         f"{fix}") from None


def check_output_path(path: Path) -> None:
    """Refuse an --out that is no place for a results file: '-', anything but a regular file
    (a device, a pipe, a socket, a directory), or a path directly in /dev or anywhere in /proc
    or /sys. A path that does not exist yet passes (check_writable looks at its folder). Reads,
    locks and creates nothing."""
    if str(path) == "-":
        raise FacliError("expected a file path for --out, got '-'; summarize appends its records "
                         "to a file (--json prints the run summary on stdout): give a path such "
                         "as results.jsonl")
    try:
        mode = os.stat(path).st_mode
    except OSError:
        mode = None  # not there (yet), or its folder is not: check_writable says which
    if mode is not None and not stat.S_ISREG(mode):
        raise FacliError(f"expected a regular file for --out, got {path}: {kind_of(mode)}; "
                         "give a path for a results file such as results.jsonl")
    folder = Path(os.path.realpath(Path(path).absolute().parent))
    system = folder == Path("/dev") or any(
        folder == Path(name) or Path(name) in folder.parents for name in SYSTEM_FOLDERS)
    if system:
        raise FacliError(f"expected --out outside /dev, /proc and /sys, got {path} (in {folder}, "
                         "whose entries are system objects); give a path such as results.jsonl")
