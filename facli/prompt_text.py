"""The text of a prompt from `--prompt TEXT` or `--prompt-file FILE` (`-` for standard input):
bounded like a summarize document, UTF-8, not empty."""

import sys
from pathlib import Path

from facli.errors import FacliError
from facli.summarize.files import DOCUMENT_LIMIT, read_user_file
from facli.units import format_bytes


def read_prompt(prompt: str | None, prompt_file: Path | None) -> str:
    if (prompt is None) == (prompt_file is None):
        raise FacliError("expected exactly one of --prompt TEXT or --prompt-file FILE")
    if prompt is not None:
        if not prompt:
            raise FacliError("expected a non-empty --prompt, got an empty string")
        return prompt
    from_stdin = str(prompt_file) == "-"
    source = "standard input" if from_stdin else str(prompt_file)
    if from_stdin:
        data = sys.stdin.buffer.read(DOCUMENT_LIMIT + 1)
        if len(data) > DOCUMENT_LIMIT:
            raise FacliError(f"expected a prompt of at most {format_bytes(DOCUMENT_LIMIT)} on "
                             "standard input, got more; give a shorter prompt")
    else:
        data = read_user_file(prompt_file, DOCUMENT_LIMIT, "--prompt-file",
                              "name a UTF-8 text file, or - for standard input")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FacliError(
            f"expected UTF-8 text in {source}, got an invalid byte at offset {exc.start}; "
            "convert it to UTF-8"
        ) from None
    if not text.strip():
        raise FacliError(f"expected a non-empty prompt, {source} is empty")
    return text
