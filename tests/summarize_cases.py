"""What the summarize tests share: small document folders, a request on the demo model, and a
character tokenizer with fake runtimes (one document at a time, or rows) that load no model."""

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import torch

from facli.run.batching import BatchStats
from facli.run.runtime import GenerationResult
from facli.run.sampling import SamplingParams
from facli.run_options import RunOptions
from facli.summarize.documents import discover, read_documents
from facli.summarize.job import JobSettings
from facli.summarize.planning import tokenize
from facli.summarize.prompting import make_prompts
from facli.summarize.run import SummarizeRequest
from facli.summarize.strategies import Budget, Strategy


CTX, NEW = 256, 4


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def mixed_folder(root: Path) -> Path:
    docs = root / "docs"
    write(docs / "a.txt", "The cat sat on the mat. It was a sunny day in the garden.\n")
    write(docs / "notes/b.md", "# Notes\n\nTwo short lines of markdown.\n")
    write(docs / "c.jsonl", '{"id": "rec-1", "text": "First record."}\n{"text": "Second record."}\n')
    write(docs / "empty.txt", b"")
    write(docs / "latin1.txt", "caf\xe9 cr\xe8me".encode("latin-1"))
    write(docs / "long.txt", "word " * 100)  # 500 byte tokens: more than ctx 256 holds
    return docs


def numbered_folder(root: Path, count: int = 8) -> Path:
    docs = root / "many"
    for index in range(count):
        write(docs / f"doc{index:02d}.txt", f"Document number {index}: a few words about item {index}.")
    return docs


# The request's own hardware is the spec to plan on, not RunOptions' recipe name.
RUN_FIELDS = {field.name for field in dataclasses.fields(RunOptions)} - {"hardware"}


def request(docs: Path, out: Path, **changes) -> SummarizeRequest:
    values = {**dict(inputs=(docs,), out=out, ctx=CTX, max_new_tokens=NEW, device="cpu",
                     batch=None), **changes}
    run = {name: values.pop(name) for name in RUN_FIELDS if name in values}
    return SummarizeRequest(**values, run=RunOptions(**run))


class CharTokenizer:
    """One token per character (id = code point + 3); 1 is BOS, 2 is EOS."""

    bos_token_id, eos_token_id = 1, 2
    chat_template = None

    def encode(self, text, add_special_tokens=True):
        return ([1] if add_special_tokens else []) + [ord(c) + 3 for c in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i - 3) for i in ids if i >= 3)


class FakeRuntime:
    """Answers every prompt with `reply`; raises out-of-memory for the first `ooms` calls."""

    def __init__(self, reply="short summary", ooms=0, interrupt_at=None):
        self.tokenizer = CharTokenizer()
        self.reply, self.ooms, self.interrupt_at = reply, ooms, interrupt_at
        self.prefill_chunk, self.ctx = 1024, 1 << 20
        self.options = SimpleNamespace(decode_mode="auto")
        self.calls, self.reconfigured = [], []

    def generate(self, prompt_ids, *, max_new_tokens, sampling, prefill_chunk=None, on_text=None,
                 on_progress=None):
        """As Runtime.generate: on_progress per prefill chunk, on_text per decoded piece."""
        self.calls.append((len(prompt_ids), prefill_chunk))
        if len(self.calls) == self.interrupt_at:
            raise KeyboardInterrupt
        if self.ooms:
            self.ooms -= 1
            raise torch.OutOfMemoryError("CUDA out of memory (fake)")
        chunk = prefill_chunk or self.prefill_chunk
        for start in range(0, len(prompt_ids), chunk):
            if on_progress is not None:
                on_progress(min(chunk, len(prompt_ids) - start))
        ids = self.tokenizer.encode(self.reply, add_special_tokens=False)[:max_new_tokens]
        for token in ids:
            if on_text is not None:
                on_text(self.tokenizer.decode([token]))
        steps = max(0, len(ids) - 2)  # timed from the end of the first decode step
        return GenerationResult(ids, self.tokenizer.decode(ids), len(prompt_ids), 0.0,
                                steps / 0.5 if steps else None, None, "length",
                                decode_steps=steps, decode_s=0.5 if steps else 0.0)

    def reconfigure(self, *, decode_mode=None, prefill_chunk=None):
        self.reconfigured.append((decode_mode, prefill_chunk))


class FakeRowsRuntime(FakeRuntime):
    """`rows` prompts at a time: fills its rows from next_request, then ends the newest first
    (so records come out of input order); out of memory after `oom_after` prompts have ended."""

    def __init__(self, rows, oom_after=None, on_finish=None, ctx=200, **kwargs):
        super().__init__(**kwargs)
        self.rows, self.oom_after, self.on_finish, self.ctx = rows, oom_after, on_finish, ctx
        self.batches, self.ended = [], 0

    def generate_rows(self, next_request, on_done, *, sampling, on_progress=None):
        progress = on_progress or (lambda prefilled, decoded: None)
        busy = []
        while True:
            while len(busy) < self.rows and (request := next_request()) is not None:
                busy.append(request)
                progress(len(request.prompt_ids), 0)
            if not busy:
                return BatchStats(prompts=self.ended, decode_steps=len(self.batches),
                                  decode_tokens=sum(self.batches), decode_s=0.1 * len(self.batches))
            self.batches.append(len(busy))
            progress(0, len(busy))
            if self.ended == self.oom_after:
                raise torch.OutOfMemoryError("CUDA out of memory (fake)")
            request = busy.pop()
            self.ended += 1
            if self.on_finish:
                self.on_finish()
            on_done(request, self.generate(request.prompt_ids, max_new_tokens=request.max_new_tokens,
                                           sampling=sampling))

    def reshape(self, *, ctx=None, rows=None):
        self.rows = rows or self.rows


def small_job(tmp_path, texts):
    """The prepared documents of `texts` and settings to fit each into a ctx of 200."""
    for index, text in enumerate(texts):
        write(tmp_path / "d" / f"{index:02d}.txt", text)
    prompts = make_prompts(CharTokenizer())
    prepared = tokenize(read_documents(discover([tmp_path / "d"])), prompts)
    settings = JobSettings(Strategy.FIT, Budget(ctx=200, max_new_tokens=4), prompts, SamplingParams())
    return prepared, settings
