"""Finding the documents to summarize, giving each a stable id, and reading them.

A document that cannot be used (unreadable, not UTF-8, empty, larger than its limit, a bad JSONL
record) comes back as a `Document` with `error` set, so that one bad file never stops the batch.
Each read is bounded (facli.summarize.files): a .txt or .md file up to DOCUMENT_LIMIT, a .jsonl
file up to JSONL_LIMIT.
"""

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

from facli.errors import FacliError
from facli.summarize.files import (
    DOCUMENT_LIMIT,
    JSONL_LIMIT,
    NotRegularError,
    TooLargeError,
    kind_of,
    read_regular,
)
from facli.units import format_bytes

SUFFIXES = (".txt", ".md", ".jsonl")


@dataclass(frozen=True)
class Document:
    """One document: `text` is None exactly when `error` says why it cannot be summarized."""

    id: str
    source: str
    text: str | None
    error: str | None = None


@dataclass(frozen=True)
class SourceFile:
    path: Path
    name: str  # the path relative to the input it came from, starting with that input's name


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:12]


def discover(inputs: Sequence[Path], exclude: Iterable[Path] = ()) -> list[SourceFile]:
    """Input files, and the .txt, .md and .jsonl files under input directories (recursively,
    sorted, hidden files and folders left out); `exclude` names files to leave out (the output)."""
    excluded = {Path(p).resolve() for p in exclude}
    found: list[SourceFile] = []
    for path in map(Path, inputs):
        if path.is_dir():
            found.extend(_walk(path, excluded))
        elif path.is_file():
            _check_suffix(path)
            if path.resolve() not in excluded:
                found.append(SourceFile(path, path.name))
        elif path.exists():
            raise FacliError(f"expected a regular file or directory, got {str(path)!r}: "
                             f"{kind_of(path.stat().st_mode)}; save the documents to files")
        else:
            raise FacliError(f"expected an existing file or directory, got {str(path)!r}; check the path")
    if not found:
        listed = ", ".join(str(p) for p in inputs)
        raise FacliError(
            f"expected at least one {', '.join(SUFFIXES)} file in {listed}, found none; "
            "point summarize at documents"
        )
    return found


def _walk(directory: Path, excluded: set[Path]) -> list[SourceFile]:
    root_name = directory.resolve().name or "root"
    files = []
    for path in sorted(directory.rglob("*")):
        relative = path.relative_to(directory)
        if any(part.startswith(".") for part in relative.parts):
            continue
        if path.suffix.lower() in SUFFIXES and path.is_file() and path.resolve() not in excluded:
            files.append(SourceFile(path, f"{root_name}/{relative.as_posix()}"))
    return files


def _check_suffix(path: Path) -> None:
    if path.suffix.lower() not in SUFFIXES:
        raise FacliError(
            f"expected a {', '.join(SUFFIXES)} file, got {str(path)!r}; rename it or pass its folder"
        )


def read_documents(files: Sequence[SourceFile], log: Callable[[str], None] = print) -> list[Document]:
    """Read every file into documents (one per .txt/.md file, one per .jsonl record), then drop
    repeats of the same id and text (saying so through `log`)."""
    documents: list[Document] = []
    for source in files:
        if source.path.suffix.lower() == ".jsonl":
            documents.extend(_read_jsonl(source))
        else:
            documents.append(_read_text(source))
    return unique(documents, log)


def _read_bytes(path: Path, limit: int) -> tuple[bytes | None, str | None]:
    try:
        return read_regular(path, limit), None
    except TooLargeError as exc:
        return None, (f"expected a file of at most {format_bytes(limit)}, got "
                      f"{exc.describe()}; split it into smaller files")
    except NotRegularError as exc:
        return None, f"expected a regular file, got {exc.kind}"
    except OSError as exc:
        return None, f"unreadable: {exc.strerror or exc}"


def _decode(data: bytes) -> tuple[str | None, str | None]:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        return None, (
            f"expected UTF-8 text, got byte 0x{data[exc.start]:02x} at offset {exc.start}; "
            "convert the file to UTF-8"
        )
    if not text.strip():
        return None, "empty document"
    return text, None


def _read_text(source: SourceFile) -> Document:
    data, error = _read_bytes(source.path, DOCUMENT_LIMIT)
    if data is None:
        return Document(f"{source.name}#unreadable", str(source.path), None, error)
    text, error = _decode(data)
    return Document(f"{source.name}#{content_hash(data)}", str(source.path), text, error)


def _read_jsonl(source: SourceFile) -> list[Document]:
    data, error = _read_bytes(source.path, JSONL_LIMIT)
    if data is None:
        return [Document(f"{source.name}#unreadable", str(source.path), None, error)]
    documents = []
    for number, line in enumerate(data.splitlines(), start=1):
        if line.strip():
            documents.append(_parse_record(source, number, line))
    if not documents:
        return [Document(f"{source.name}#{content_hash(data)}", str(source.path), None, "empty document")]
    return documents


def _parse_record(source: SourceFile, number: int, line: bytes) -> Document:
    where = f"{source.path}:{number}"
    fallback_id = f"{source.name}:{number}#{content_hash(line)}"
    if len(line) > DOCUMENT_LIMIT:
        return Document(fallback_id, where, None, f"expected a record of at most "
                        f"{format_bytes(DOCUMENT_LIMIT)}, got {format_bytes(len(line))}; split "
                        "its text into smaller records")
    text, error = _decode(line)
    if text is None:
        return Document(fallback_id, where, None, error)
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        return Document(fallback_id, where, None, f"expected a JSON object, got invalid JSON: {exc}")
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        return Document(fallback_id, where, None, 'expected a JSON object with a string "text" field')
    given = record.get("id")
    if given is not None and not isinstance(given, (str, int)):
        return Document(fallback_id, where, None, f'expected "id" to be a string or integer, got {given!r}')
    text = record["text"]
    doc_id = str(given) if given is not None else f"{source.name}#{content_hash(text.encode())}"
    if not text.strip():
        return Document(doc_id, where, None, "empty document")
    return Document(doc_id, where, text, None)


def unique(documents: Sequence[Document], log: Callable[[str], None] = print) -> list[Document]:
    """Keep the first of documents with the same id and text; the same id with different text is
    a user error, since results are keyed by id."""
    first: dict[str, Document] = {}
    kept = []
    for doc in documents:
        seen = first.get(doc.id)
        if seen is None:
            first[doc.id] = doc
            kept.append(doc)
        elif seen.text != doc.text or seen.error != doc.error:
            raise FacliError(
                f"expected unique document ids, got {doc.id!r} in {seen.source} and {doc.source}; "
                "give each record its own id"
            )
        else:
            log(f"facli: {doc.source} repeats {seen.source}; summarizing it once")
    return kept
