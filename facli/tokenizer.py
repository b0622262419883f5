"""Tokenizer loading (local files only) and incremental detokenization for streaming."""

from pathlib import Path

from facli.errors import FacliError


def load_tokenizer(path: Path):
    """The checkpoint's own tokenizer through transformers' AutoTokenizer, never from a hub."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FacliError(
            f"expected tokenizer files (tokenizer.json or tokenizer.model) in {path}, "
            f"could not load them: {first_line}"
        ) from None


class TextStream:
    """Turns a growing list of token ids into the newly finished text, one piece at a time.

    Byte-level tokenizers split characters over tokens; text ending in an incomplete character
    (decoded as U+FFFD) is held back until the character completes.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.token_ids: list[int] = []
        self.emitted = ""

    def push(self, token_id: int) -> str:
        self.token_ids.append(token_id)
        text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        piece, self.emitted = text[len(self.emitted):], text
        return piece

    def text(self) -> str:
        return self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
