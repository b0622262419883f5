"""facli summarize, piece by piece: documents, prompts, strategies, the manifest, OOM fallbacks
and the loop, with a character tokenizer and a fake runtime (no model). The output file:
tests/summarize/test_summarize_output.py."""

import json

import pytest

from facli.errors import FacliError
from facli.run.runtime import GenerationResult
from facli.run.sampling import SamplingParams
from facli.summarize import manifest as manifests
from facli.summarize.documents import discover, read_documents
from facli.summarize.faults import Attempt, OomGuard, attempts
from facli.summarize.interrupt import StopRequest
from facli.summarize.job import run_documents
from facli.summarize.output import ResultWriter
from facli.summarize.planning import plan_corpus, tokenize
from facli.summarize.prompting import make_builder, make_prompts, read_template
from facli.summarize.strategies import Budget, DocumentFailed, Strategy, cut_middle, split_even, summarize
from summarize_cases import CharTokenizer, FakeRuntime, small_job, write


class ChatTokenizer(CharTokenizer):
    chat_template = "{{ messages }}"

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        assert not tokenize and add_generation_prompt
        return f"<user>{messages[0]['content']}</user><bot>"


# documents


def test_discover_walks_folders_sorted_skipping_hidden_other_suffixes_and_the_output(tmp_path):
    docs = tmp_path / "docs"
    for name in ("b.txt", "a.md", "sub/c.jsonl", ".hidden/x.txt", "notes.pdf", "results.jsonl"):
        write(docs / name, "x")
    found = discover([docs], exclude=[docs / "results.jsonl"])
    assert [f.name for f in found] == ["docs/a.md", "docs/b.txt", "docs/sub/c.jsonl"]


@pytest.mark.parametrize("name, message", [("missing.txt", "existing file"), ("paper.pdf", ".txt")],
                         ids=["missing", "wrong-suffix"])
def test_discover_user_errors(tmp_path, name, message):
    if name.endswith(".pdf"):
        write(tmp_path / name, "x")
    with pytest.raises(FacliError, match=message):
        discover([tmp_path / name])


def test_bad_documents_are_failed_records_not_errors(tmp_path):
    write(tmp_path / "d/empty.txt", b"")
    write(tmp_path / "d/blank.md", b"  \n\n")
    write(tmp_path / "d/latin1.txt", "caf\xe9".encode("latin-1"))
    write(tmp_path / "d/ok.txt", "fine text")
    docs = {d.source.rsplit("/", 1)[-1]: d for d in read_documents(discover([tmp_path / "d"]))}
    assert docs["empty.txt"].error == docs["blank.md"].error == "empty document"
    assert "expected UTF-8" in docs["latin1.txt"].error and "offset 3" in docs["latin1.txt"].error
    assert docs["ok.txt"].text == "fine text" and docs["ok.txt"].error is None


def test_unreadable_file_is_a_failed_document(tmp_path, monkeypatch):
    path = write(tmp_path / "secret.txt", "x")

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    files = discover([path])
    monkeypatch.setattr("facli.summarize.files.os.open", refuse)  # root may read a chmod 000 file
    (doc,) = read_documents(files)
    assert doc.text is None and doc.error == "unreadable: Permission denied"
    assert doc.id == "secret.txt#unreadable"


def test_ids_are_relative_path_plus_content_hash_and_stable(tmp_path):
    write(tmp_path / "d/a.txt", "alpha")
    first = read_documents(discover([tmp_path / "d"]))[0].id
    assert first.startswith("d/a.txt#") and len(first.split("#")[1]) == 12
    assert read_documents(discover([tmp_path / "d/../d"]))[0].id == first
    write(tmp_path / "d/a.txt", "alpha, edited")
    assert read_documents(discover([tmp_path / "d"]))[0].id != first


def test_jsonl_records_ids_and_bad_lines(tmp_path):
    lines = ['{"id": "given", "text": "one"}', '{"text": "two"}', "", "{broken",
             '{"id": 7, "text": ""}', '{"no_text": 1}']
    write(tmp_path / "c.jsonl", "\n".join(lines) + "\n")
    docs = read_documents(discover([tmp_path / "c.jsonl"]))
    assert [d.id.split("#")[0] for d in docs] == ["given", "c.jsonl", "c.jsonl:4", "7", "c.jsonl:6"]
    assert [d.error is None for d in docs] == [True, True, False, False, False]
    assert docs[1].source.endswith("c.jsonl:2") and docs[3].error == "empty document"


def test_repeated_ids_same_text_kept_once_different_text_is_an_error(tmp_path):
    write(tmp_path / "c.jsonl", '{"id": "x", "text": "same"}\n{"id": "x", "text": "same"}\n')
    assert len(read_documents(discover([tmp_path / "c.jsonl"]))) == 1
    write(tmp_path / "c.jsonl", '{"id": "x", "text": "one"}\n{"id": "x", "text": "two"}\n')
    with pytest.raises(FacliError, match="unique document ids"):
        read_documents(discover([tmp_path / "c.jsonl"]))


# prompts


def test_plain_prompt_is_bos_document_instruction_suffix():
    builder = make_prompts(CharTokenizer()).summarize
    prompt = CharTokenizer().decode(builder.build(builder.encode("DOC")))
    assert builder.prefix_ids == (1,)
    assert prompt == "DOC\n\nSummarize the document above in a few sentences.\n\nSummary:"


def test_chat_template_and_user_template(tmp_path):
    template = write(tmp_path / "t.txt", "TL;DR of {document} please")
    builder = make_builder(ChatTokenizer(), read_template(template))
    text = CharTokenizer().decode(builder.build(builder.encode("DOC")))
    assert text == "<user>TL;DR of DOC please</user><bot>"
    assert builder.overhead == len(text) - 3


def test_user_template_needs_one_placeholder(tmp_path):
    with pytest.raises(FacliError, match=r"\{document\} exactly once"):
        read_template(write(tmp_path / "t.txt", "no placeholder"))


# strategies and planning


def _generate_recorder(reply="sum"):
    prompts_seen = []

    def generate(prompt_ids):
        prompts_seen.append(list(prompt_ids))
        ids = CharTokenizer().encode(reply, add_special_tokens=False)
        return GenerationResult(ids, reply, len(prompt_ids), 0.0, 0.0, None, "eos")

    return generate, prompts_seen


def test_fit_fails_long_documents_with_the_reason_and_runs_short_ones():
    prompts = make_prompts(CharTokenizer())
    budget = Budget(ctx=prompts.summarize.overhead + 20 + 4, max_new_tokens=4)
    generate, seen = _generate_recorder()
    long = summarize(Strategy.FIT, [50] * 21, prompts, budget, generate)
    assert long.summary is None and "at most 20 document tokens" in long.error and not seen
    short = summarize(Strategy.FIT, [50] * 20, prompts, budget, generate)
    assert short.summary == "sum" and short.error is None
    assert short.prompt_tokens == len(seen[0]) == budget.ctx - 4


def test_truncate_keeps_head_and_tail():
    builder = make_prompts(CharTokenizer()).summarize
    ids = builder.encode("H" * 50 + "m" * 200 + "T" * 50)
    kept = CharTokenizer().decode(cut_middle(ids, 61, builder))
    assert len(kept) == 61 and kept == "H" * 26 + "\n\n[...]\n\n" + "T" * 26


def test_map_reduce_summarizes_chunks_then_the_summaries():
    prompts = make_prompts(CharTokenizer())
    budget = Budget(ctx=prompts.combine.overhead + 20 + 4, max_new_tokens=4)
    generate, seen = _generate_recorder("abcd")
    outcome = summarize(Strategy.MAP_REDUCE, [60] * 100, prompts, budget, generate)
    limit = budget.document_tokens(prompts.summarize)
    assert 20 < limit < 100 and len(seen) == len(split_even([0] * 100, limit)) + 1 == 3
    assert all(len(p) <= budget.ctx - 4 for p in seen)
    assert "abcd\n\nabcd" in CharTokenizer().decode(seen[-1])
    assert outcome.summary == "abcd" and outcome.generated_tokens == 4 * len(seen)


def test_split_even_makes_the_fewest_nearly_equal_chunks():
    chunks = split_even(list(range(101)), 50)
    assert [len(c) for c in chunks] == [34, 34, 33] and sum(chunks, []) == list(range(101))


def test_plan_counts_fitting_documents_and_sizes_the_runtime_context(tmp_path):
    for name, size in (("a.txt", 10), ("b.txt", 30), ("c.txt", 300)):
        write(tmp_path / "d" / name, "x" * size)
    write(tmp_path / "d/empty.txt", "")
    prompts = make_prompts(CharTokenizer())
    prepared = tokenize(read_documents(discover([tmp_path / "d"])), prompts)
    budget = Budget(ctx=prompts.summarize.overhead + 100 + 8, max_new_tokens=8)
    fit = plan_corpus(prepared, prompts, budget, Strategy.FIT)
    assert (fit.documents, fit.unusable, fit.fit) == (4, 1, 2)
    assert fit.longest_prompt_tokens == 300 + prompts.summarize.overhead
    assert fit.runtime_ctx == 30 + prompts.summarize.overhead + 8
    assert plan_corpus(prepared, prompts, budget, Strategy.TRUNCATE).runtime_ctx == budget.ctx
    with pytest.raises(FacliError, match="no room for the document"):
        plan_corpus(prepared, prompts, Budget(ctx=40, max_new_tokens=8), Strategy.FIT)


# output file and manifest


def test_manifest_path_and_resume_check(tmp_path):
    assert manifests.manifest_path(tmp_path / "results.jsonl") == tmp_path / "results.manifest.json"
    model = {"name": "m", "path": "/m", "config_hash": "sha256:1"}
    previous = manifests.new_manifest(None, model=model, settings={"seed": 0}, plan={})
    manifests.check_resumable(previous, model, {"seed": 0}, tmp_path / "r.jsonl")
    with pytest.raises(FacliError, match="expected the seed of the run that wrote"):
        manifests.check_resumable(previous, model, {"seed": 1}, tmp_path / "r.jsonl")
    with pytest.raises(FacliError, match="model config"):
        manifests.check_resumable(previous, {**model, "config_hash": "sha256:2"}, {"seed": 0},
                                  tmp_path / "r.jsonl")


# out-of-memory fallbacks


def test_attempts_shrink_the_prefill_chunk_then_change_the_decode_mode():
    assert attempts(4096, 10000) == [Attempt(), Attempt(2048), Attempt(1024),
                                     Attempt(1024, "prefetch"), Attempt(1024, "cpu")]
    assert attempts(4096, 200, "prefetch") == [Attempt(), Attempt(200, "cpu")]


def test_oom_retries_then_succeeds_and_restores_the_runtime():
    runtime = FakeRuntime(ooms=3)
    guard = OomGuard(runtime, max_new_tokens=4, sampling=SamplingParams())
    result = guard(list(range(3000)))
    assert result.text == "shor"
    assert [chunk for _, chunk in runtime.calls] == [None, 512, 256, 256]
    assert runtime.reconfigured == [("prefetch", None), ("auto", 1024)]


def test_oom_on_every_attempt_fails_the_document():
    runtime = FakeRuntime(ooms=100)
    guard = OomGuard(runtime, max_new_tokens=4, sampling=SamplingParams())
    with pytest.raises(DocumentFailed, match="out of memory"):
        guard(list(range(3000)))
    assert len(runtime.calls) == 5


def test_other_errors_are_not_swallowed():
    runtime = FakeRuntime()
    runtime.generate = lambda *a, **k: (_ for _ in ()).throw(ValueError("a bug"))
    with pytest.raises(ValueError, match="a bug"):
        OomGuard(runtime, max_new_tokens=4, sampling=SamplingParams())([1, 2, 3])


# the loop


def test_loop_records_every_document_and_one_oom_failure_does_not_stop_it(tmp_path):
    prepared, settings = small_job(tmp_path, ["one", "", "x" * 500, "four"])
    runtime = FakeRuntime(ooms=5)
    with ResultWriter(tmp_path / "r.jsonl") as writer:
        summary = run_documents(runtime, prepared, writer, settings)
    records = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [r["status"] for r in records] == ["failed", "failed", "failed", "ok"]
    assert "out of memory" in records[0]["error"] and records[1]["error"] == "empty document"
    assert "at most" in records[2]["error"]
    assert (summary.done, summary.failed, summary.interrupted) == (1, 3, False)


def test_loop_on_a_non_writer_rank_writes_nothing(tmp_path):
    prepared, settings = small_job(tmp_path, ["one", "two"])
    runtime = FakeRuntime()
    summary = run_documents(runtime, prepared, None, settings, is_writer=False)
    assert summary.done == 2 and len(runtime.calls) == 2 and not (tmp_path / "r.jsonl").exists()


def test_stop_request_finishes_the_current_document(tmp_path):
    prepared, settings = small_job(tmp_path, ["one", "two", "three"])
    stop = StopRequest(announce=False)
    runtime = FakeRuntime()
    original = runtime.generate

    def generate_then_stop(*args, **kwargs):
        stop.requested = True
        return original(*args, **kwargs)

    runtime.generate = generate_then_stop
    with ResultWriter(tmp_path / "r.jsonl") as writer:
        summary = run_documents(runtime, prepared, writer, settings, stop=stop)
    assert summary.interrupted and summary.done == 1
    assert len((tmp_path / "r.jsonl").read_text().splitlines()) == 1


def test_second_interrupt_abandons_the_current_document(tmp_path):
    prepared, settings = small_job(tmp_path, ["one", "two", "three"])
    with ResultWriter(tmp_path / "r.jsonl") as writer:
        summary = run_documents(FakeRuntime(interrupt_at=2), prepared, writer, settings)
    assert summary.interrupted and summary.done == 1
    assert len((tmp_path / "r.jsonl").read_text().splitlines()) == 1
