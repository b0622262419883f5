"""Prompts around a document: the tokenizer's chat template where it has one, else plain text.

A prompt is built as `prefix + document tokens + suffix`, with prefix and suffix tokenized once,
so that the token count of every prompt is known exactly and a document can be cut to fit.
"""

from dataclasses import dataclass
from pathlib import Path

from facli.errors import FacliError
from facli.models.tokenizer import render_chat
from facli.summarize.files import TEMPLATE_LIMIT, read_user_file

PLACEHOLDER = "{document}"
# The instruction follows the document: small models lose an instruction that a long document
# separates from the answer, and then continue the document instead of summarizing it.
SUMMARIZE_MESSAGE = "{document}\n\nSummarize the document above in a few sentences."
COMBINE_MESSAGE = (
    "{document}\n\nThe text above holds summaries of consecutive parts of one document. "
    "Combine them into one summary of a few sentences."
)
PLAIN_SUFFIX = "\n\nSummary:"
# Greedy summaries from small models fall into loops without a mild repetition penalty.
SUMMARY_REPETITION_PENALTY = 1.1
_MARKER = "\u2063FACLI-DOCUMENT\u2063"


@dataclass(frozen=True)
class PromptBuilder:
    """Turns document text into prompt token ids; `overhead` is the template's token count."""

    tokenizer: object
    prefix_ids: tuple[int, ...]
    suffix_ids: tuple[int, ...]

    @property
    def overhead(self) -> int:
        return len(self.prefix_ids) + len(self.suffix_ids)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def build(self, document_ids: list[int]) -> list[int]:
        return [*self.prefix_ids, *document_ids, *self.suffix_ids]


@dataclass(frozen=True)
class Prompts:
    """The prompt for a document or a chunk of one, and the prompt that combines chunk summaries."""

    summarize: PromptBuilder
    combine: PromptBuilder


def read_template(path: Path | None) -> str | None:
    """The text of a user template file, which must hold `{document}` exactly once."""
    if path is None:
        return None
    data = read_user_file(path, TEMPLATE_LIMIT, "--prompt-template",
                          f"give a UTF-8 text file with {PLACEHOLDER} where the document goes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FacliError(f"expected a UTF-8 prompt template, got {path}: byte "
                         f"0x{data[exc.start]:02x} at offset {exc.start}; convert it to UTF-8") from None
    count = text.count(PLACEHOLDER)
    if count != 1:
        raise FacliError(
            f"expected {PLACEHOLDER} exactly once in prompt template {path}, found it {count} "
            f"times; write {PLACEHOLDER} where the document goes"
        )
    return text


def make_prompts(tokenizer, template: str | None = None) -> Prompts:
    """With a user template, it is the user message under a chat template, or the whole prompt
    without one; it then serves both for documents and for combining summaries."""
    return Prompts(
        summarize=make_builder(tokenizer, template or SUMMARIZE_MESSAGE, plain=template is None),
        combine=make_builder(tokenizer, template or COMBINE_MESSAGE, plain=template is None),
    )


def make_builder(tokenizer, message: str, *, plain: bool = True) -> PromptBuilder:
    """Render `message` (holding `{document}`) into token ids before and after the document."""
    marked = message.replace(PLACEHOLDER, _MARKER)
    if getattr(tokenizer, "chat_template", None):
        rendered = render_chat(tokenizer, [{"role": "user", "content": marked}])
        bos = []
    else:
        rendered = marked + (PLAIN_SUFFIX if plain else "")
        bos = [tokenizer.bos_token_id] if getattr(tokenizer, "bos_token_id", None) is not None else []
    prefix, found, suffix = rendered.partition(_MARKER)
    assert found, "the chat template dropped the document"
    return PromptBuilder(tokenizer, tuple(bos + _encode(tokenizer, prefix)), tuple(_encode(tokenizer, suffix)))


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False)) if text else []
