"""Tokenizer loading (local files only) and incremental detokenization for streaming."""

from pathlib import Path

from facli.errors import FacliError
from facli.summarize.files import read_user_file


# The files AutoTokenizer reads from a checkpoint; the largest real ones (tokenizer.json of a
# 256K vocabulary) hold some 35 MiB.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt")
TOKENIZER_FILE_LIMIT = 256 << 20


def load_tokenizer(path: Path):
    """The checkpoint's own tokenizer through transformers' AutoTokenizer, never from a hub."""
    from transformers import AutoTokenizer  # here, not at the top: `facli` starts without it

    for name in TOKENIZER_FILES:
        if (Path(path) / name).exists():  # bounded and regular, before transformers reads it
            read_user_file(Path(path) / name, TOKENIZER_FILE_LIMIT, f"tokenizer file {name}",
                           "copy the checkpoint's tokenizer files again")
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure here is the files', said in one line
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        if not isinstance(exc, (OSError, ValueError)):  # KeyError 'added_tokens' needs its name
            first_line = f"{type(exc).__name__} {first_line}".strip()
        raise FacliError(
            f"expected tokenizer files (tokenizer.json or tokenizer.model) in {path}, "
            f"could not load them: {first_line}"
        ) from None


def render_chat(tokenizer, messages: list[dict]) -> str:
    """`messages` through the tokenizer's chat template, ending where the assistant's reply
    starts (the template writes any BOS itself: encode the text without special tokens)."""
    from jinja2.exceptions import TemplateError

    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except TemplateError as exc:
        raise FacliError(f"the model's chat template refused the messages: {exc}") from None


def chat_prompt_ids(tokenizer, text: str, system: str | None = None) -> list[int]:
    """Token ids of `text` as a user message (after `system`, if given) under the chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise FacliError("expected a tokenizer with a chat template for --chat, this model has "
                         "none; drop --chat and write the whole prompt")
    messages = [{"role": "system", "content": system}] if system else []
    rendered = render_chat(tokenizer, messages + [{"role": "user", "content": text}])
    return list(tokenizer.encode(rendered, add_special_tokens=False))


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


class StopText:
    """Generated text cut before the first of `stops` (non-empty strings). Pieces come in as a
    TextStream makes them; up to the longest stop's length minus one character is held back, so
    that no part of a stop string is ever emitted."""

    def __init__(self, stops: tuple[str, ...] = ()):
        self.stops = stops
        self.hold = max((len(stop) for stop in stops), default=1) - 1
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def push(self, piece: str) -> str:
        """The text now safe to emit; sets `stopped` once a stop string appears."""
        if self.stopped or not piece:
            return ""
        searched_from = max(0, len(self.text) - self.hold)
        self.text += piece
        hits = [at for at in (self.text.find(stop, searched_from) for stop in self.stops) if at >= 0]
        if hits:
            self.stopped = True
            self.text = self.text[:min(hits)]
            return self._emit(len(self.text))
        return self._emit(len(self.text) - self.hold)

    def flush(self) -> str:
        """What is held back, once generation has ended."""
        return self._emit(len(self.text))

    def _emit(self, upto: int) -> str:
        piece = self.text[self.emitted:max(upto, self.emitted)]
        self.emitted += len(piece)
        return piece
