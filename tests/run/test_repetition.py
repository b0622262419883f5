"""Repetition controls (--repetition-penalty, --no-repeat-ngram-size) against transformers' own
logits processors and generate: the processed logits on random ones, the distribution sampled
from, greedy and sampled tokens of whole generations, rows decoded together, and the CLI."""

import json
import math

import pytest
import torch
from checkpoints import build_checkpoint, load_llama
from transformers.generation.logits_process import (
    LogitsProcessorList,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from cli_errors import error_line, invoke
from conftest import requires_cuda
from facli.errors import FacliError
from facli.models.checkpoint import CheckpointReader
from facli.models.config import ModelConfig
from facli.models.llama import CausalLM
from facli.offload.device_cache import DeviceKVCache
from facli.run.batching import BatchedEngine, RowRequest
from facli.run.engine import Engine
from facli.run.sampling import Sampler, SamplingParams, TokenHistory

CPU = torch.device("cpu")


def _transformers_processors(params: SamplingParams) -> LogitsProcessorList:
    """What transformers' generate builds for these settings, in its order."""
    processors = LogitsProcessorList()
    if params.repetition_penalty != 1:
        processors.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
    if params.no_repeat_ngram_size:
        processors.append(NoRepeatNGramLogitsProcessor(params.no_repeat_ngram_size))
    if not params.greedy:
        processors.append(TemperatureLogitsWarper(params.temperature))
        if params.top_k:
            processors.append(TopKLogitsWarper(params.top_k))
        if params.top_p < 1:
            processors.append(TopPLogitsWarper(params.top_p))
    return processors


def _sequences(rows, length, vocab, seed, *, alphabet=None):
    """[rows, length] ids from a small alphabet, so that tokens and n-grams repeat."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, alphabet or vocab, (rows, length), generator=generator)


CONTROLS = {
    "penalty1.3": (1.3, 0),
    "penalty0.7": (0.7, 0),
    "ngram1": (1.0, 1),
    "ngram2": (1.0, 2),
    "ngram3": (1.0, 3),
    "penalty1.2-ngram2": (1.2, 2),
    "penalty2-ngram4": (2.0, 4),
}
SHAPES = {"B1-V7-T1": (1, 7, 1), "B1-V7-T9": (1, 7, 9), "B3-V383-T63": (3, 383, 63),
          "B2-V1001-T5": (2, 1001, 5)}


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("controls", list(CONTROLS.values()), ids=list(CONTROLS))
def test_processed_logits_equal_transformers(controls, shape):
    """The prompt through start(), then tokens one at a time through push(): at every step the
    logits equal transformers' processors on the whole sequence so far, bit for bit."""
    penalty, ngram = controls
    rows, vocab, length = shape
    params = SamplingParams(repetition_penalty=penalty, no_repeat_ngram_size=ngram)
    ids = _sequences(rows, length + 6, vocab, seed=length, alphabet=min(vocab, 5))
    reference = _transformers_processors(params)
    history = TokenHistory(params, rows, vocab, CPU)
    for row in range(rows):
        history.start(row, ids[row, :length].tolist())
    generator = torch.Generator().manual_seed(vocab)
    changed = False
    for step in range(length, length + 6):
        logits = torch.randn(rows, vocab, generator=generator) * 3
        expected = reference(ids[:, :step], logits.clone())
        got = history.apply(logits)
        assert torch.equal(got, expected), step
        changed |= not torch.equal(got, logits)
        history.push(ids[:, step])
    assert changed


def test_prompt_ids_past_the_logits_vocabulary_are_ignored():
    """A tokenizer with more ids than the LM head has rows: those ids cannot be generated, and
    neither the penalty nor the ban touches anything for them (recent transformers releases
    ignore them too; earlier ones fail on them)."""
    vocab = 11
    ids = torch.tensor([[3, 12, 4, 3, 12, 13, 3, 12]])
    logits = torch.randn(1, vocab)
    penalty = SamplingParams(repetition_penalty=1.5)
    history = TokenHistory(penalty, 1, vocab, CPU)
    history.start(0, ids[0].tolist())
    in_vocab = ids[ids < vocab].view(1, -1)  # the penalty counts presence only
    assert torch.equal(history.apply(logits.clone()),
                       _transformers_processors(penalty)(in_vocab, logits.clone()))
    ban = TokenHistory(SamplingParams(no_repeat_ngram_size=2), 1, vocab, CPU)
    ban.start(0, ids[0].tolist())
    expected = logits.clone()
    expected[0, 4] = float("-inf")  # the sequence ends in 12, and (12, 4) was seen; (12, 13) is off the vocabulary
    assert torch.equal(ban.apply(logits.clone()), expected)


SAMPLED = {
    "t0.8": SamplingParams(temperature=0.8, repetition_penalty=1.3, no_repeat_ngram_size=2),
    "t1.1-topk9": SamplingParams(temperature=1.1, top_k=9, repetition_penalty=1.5),
    "t0.6-topp0.85": SamplingParams(temperature=0.6, top_p=0.85, no_repeat_ngram_size=1),
    "t1-topk40-topp0.9": SamplingParams(temperature=1.0, top_k=40, top_p=0.9,
                                        repetition_penalty=0.8, no_repeat_ngram_size=3),
}


@pytest.mark.parametrize("params", list(SAMPLED.values()), ids=list(SAMPLED))
def test_sampled_distribution_equals_transformers(params):
    """Penalty and bans first, then temperature, top-k and top-p: the distribution sampled from
    equals softmax of transformers' processors and warpers in generate's order."""
    rows, vocab, length = 3, 127, 41
    ids = _sequences(rows, length, vocab, seed=7, alphabet=40)
    history = TokenHistory(params, rows, vocab, CPU)
    for row in range(rows):
        history.start(row, ids[row].tolist())
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(3)) * 2
    expected = torch.softmax(_transformers_processors(params)(ids, logits.clone()), dim=-1)
    got = Sampler(params, CPU).probabilities(history.apply(logits))
    assert torch.equal(got == 0, expected == 0)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)


def test_a_row_with_every_token_banned_takes_token_0_greedy_or_sampled():
    """Greedy argmax over all -inf is token 0 (transformers' greedy gives the same); sampling
    would draw from nan, so it takes that token too, and other rows sample as usual."""
    params = SamplingParams(no_repeat_ngram_size=1)
    history = TokenHistory(params, 2, 5, CPU)
    history.start(0, [4, 3, 2, 1, 0, 2])
    history.start(1, [4, 3])
    logits = history.apply(torch.randn(2, 5))
    assert torch.isneginf(logits[0]).all() and torch.isneginf(logits[1, 3:]).all()
    assert Sampler(params, CPU)(logits)[0] == 0
    sampled = SamplingParams(temperature=1.0, seed=5, no_repeat_ngram_size=1)
    for _ in range(20):
        token = Sampler(sampled, CPU)(logits)
        assert token[0] == 0 and token[1] in (0, 1, 2)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama-repetition")
    reference = build_checkpoint(directory, "llama", num_key_value_heads=2)
    reference.generation_config.eos_token_id = None  # run every step, as the engine below does
    config = ModelConfig.from_dir(directory)
    model = CausalLM(config, dtype=torch.float32, device="cpu")
    model.load(CheckpointReader(directory))
    return reference, model


def _engine(model, rows=1, capacity=128):
    config = model.config
    cache = DeviceKVCache(config.num_hidden_layers, rows, capacity, config.num_key_value_heads,
                          config.head_dim, torch.float32, CPU)
    engine = Engine if rows == 1 else BatchedEngine
    return engine(model, cache, prefill_chunk=16)


def _hf_generate(reference, prompt, params, new_tokens):
    extra = dict(do_sample=False)
    if not params.greedy:
        extra = dict(do_sample=True, temperature=params.temperature, top_k=params.top_k or None,
                     top_p=params.top_p)
        torch.manual_seed(params.seed)  # transformers samples from the global generator
    with torch.no_grad():
        out = reference.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
            repetition_penalty=params.repetition_penalty,
            no_repeat_ngram_size=params.no_repeat_ngram_size, pad_token_id=0, **extra)
    return out[0, prompt.shape[1]:].tolist()


GENERATIONS = {
    "greedy-penalty1.3-T1": (SamplingParams(repetition_penalty=1.3), 1),
    "greedy-penalty1.25-T37": (SamplingParams(repetition_penalty=1.25), 37),
    "greedy-ngram2-T7": (SamplingParams(no_repeat_ngram_size=2), 7),
    "greedy-ngram3-T37": (SamplingParams(no_repeat_ngram_size=3), 37),
    "greedy-both-T19": (SamplingParams(repetition_penalty=1.5, no_repeat_ngram_size=2), 19),
    "sampled-both-T19": (SamplingParams(temperature=0.9, top_k=30, top_p=0.95, seed=11,
                                        repetition_penalty=1.3, no_repeat_ngram_size=3), 19),
}


@pytest.mark.parametrize("params, prompt_len", list(GENERATIONS.values()), ids=list(GENERATIONS))
def test_generation_equals_transformers_generate(pair, params, prompt_len):
    """Token for token the same as model.generate(repetition_penalty=...,
    no_repeat_ngram_size=...), and different from a run without the controls (a random model
    repeats itself), so the controls are what made them equal."""
    reference, model = pair
    new_tokens = 40
    prompt = _sequences(1, prompt_len, 384, seed=prompt_len, alphabet=24) + 3
    expected = _hf_generate(reference, prompt, params, new_tokens)
    run = _engine(model).generate(prompt[0].tolist(), max_new_tokens=new_tokens,
                                  sampler=Sampler(params, CPU))
    assert run.token_ids == expected
    plain = SamplingParams(temperature=params.temperature, top_k=params.top_k,
                           top_p=params.top_p, seed=params.seed)
    assert _engine(model).generate(prompt[0].tolist(), max_new_tokens=new_tokens,
                                   sampler=Sampler(plain, CPU)).token_ids != expected
    if params.no_repeat_ngram_size:
        n, sequence = params.no_repeat_ngram_size, prompt[0].tolist() + run.token_ids
        grams = list(zip(*(sequence[i:] for i in range(n))))
        assert len(grams) == len(set(grams))


@pytest.mark.parametrize("params", [SamplingParams(repetition_penalty=1.4, no_repeat_ngram_size=2),
                                    SamplingParams(temperature=0.8, seed=4, top_k=50,
                                                   repetition_penalty=1.2, no_repeat_ngram_size=3)],
                         ids=["greedy", "sampled"])
def test_rows_decoded_together_keep_their_own_history(pair, params):
    """Five prompts in three rows (rows freed and refilled, prompts of other lengths) give the
    tokens of each prompt run alone."""
    _, model = pair
    generator = torch.Generator().manual_seed(2)
    lengths, budgets = (5, 31, 12, 2, 20), (30, 12, 25, 40, 18)
    requests = [RowRequest(torch.randint(3, 40, (length,), generator=generator).tolist(), new,
                           key=index) for index, (length, new) in enumerate(zip(lengths, budgets))]
    want = {request.key: _engine(model).generate(
        request.prompt_ids, max_new_tokens=request.max_new_tokens,
        sampler=Sampler(params, CPU)).token_ids for request in requests}
    queue, got = list(requests), {}
    _engine(model, rows=3).run(lambda: queue.pop(0) if queue else None,
                               lambda request, run: got.setdefault(request.key, run.token_ids),
                               sampling=params)
    assert got == want


@requires_cuda
@pytest.mark.parametrize("rows", [1, 3])
def test_graphed_decode_steps_take_the_controls_as_eager_ones(tmp_path, rows):
    """bf16 on a GPU, where decode steps replay a CUDA graph: the controls act on the graph's
    logits outside it, giving the tokens of eager steps (one row, or rows refilled)."""
    model = load_llama(tmp_path, torch.bfloat16, "cuda", num_key_value_heads=2)
    params = SamplingParams(temperature=0.7, top_k=40, seed=9, repetition_penalty=1.3,
                            no_repeat_ngram_size=2)
    generator = torch.Generator().manual_seed(5)
    requests = [RowRequest(torch.randint(3, 40, (length,), generator=generator).tolist(), 24,
                           key=index) for index, length in enumerate((9, 30, 4, 17, 11))]
    runs = []
    for graphs in (True, False):
        config = model.config
        cache = DeviceKVCache(config.num_hidden_layers, rows, 96, config.num_key_value_heads,
                              config.head_dim, torch.bfloat16, torch.device("cuda"))
        if rows == 1:
            engine = Engine(model, cache, prefill_chunk=16, use_graphs=graphs)
            runs.append({request.key: engine.generate(
                request.prompt_ids, max_new_tokens=request.max_new_tokens,
                sampler=Sampler(params, model.device)).token_ids for request in requests})
            assert (engine._graphed_step is not None) == graphs
        else:
            engine, queue, got = (BatchedEngine(model, cache, prefill_chunk=16, use_graphs=graphs),
                                  list(requests), {})
            engine.run(lambda: queue.pop(0) if queue else None,
                       lambda request, run: got.setdefault(request.key, run.token_ids),
                       sampling=params)
            assert (engine.engine._graphed_step is not None) == graphs
            runs.append(got)
    graphed, eager = runs
    assert graphed == eager
    for key, tokens in graphed.items():
        sequence = requests[key].prompt_ids + tokens
        assert len(set(zip(sequence, sequence[1:]))) == len(sequence) - 1


@pytest.mark.parametrize("changes, words", [
    (dict(repetition_penalty=0.0), "--repetition-penalty a finite number in (0, inf)"),
    (dict(repetition_penalty=-1.2), "--repetition-penalty"),
    (dict(repetition_penalty=math.inf), "--repetition-penalty"),
    (dict(repetition_penalty=math.nan), "--repetition-penalty"),
    (dict(no_repeat_ngram_size=-1), "--no-repeat-ngram-size a whole number from 0"),
    (dict(no_repeat_ngram_size=2.0), "--no-repeat-ngram-size"),
    (dict(no_repeat_ngram_size=True), "--no-repeat-ngram-size"),
], ids=["penalty0", "penalty-negative", "penalty-inf", "penalty-nan", "ngram-negative",
        "ngram-float", "ngram-bool"])
def test_sampling_params_refuse_bad_controls(changes, words):
    with pytest.raises(FacliError, match=words.replace("(", r"\(").replace(")", r"\)")):
        SamplingParams(**changes)


@pytest.mark.parametrize("command", ["generate", "summarize"])
@pytest.mark.parametrize("option, value, words", [
    ("--repetition-penalty", "0", "expected --repetition-penalty a finite number in (0, inf)"),
    ("--repetition-penalty", "nan", "--repetition-penalty"),
    ("--no-repeat-ngram-size", "-2", "expected --no-repeat-ngram-size a whole number from 0"),
], ids=["penalty0", "penalty-nan", "ngram-negative"])
def test_cli_refuses_bad_controls_in_one_line(tmp_path, command, option, value, words):
    args = (["generate", "--prompt", "hi"] if command == "generate"
            else ["summarize", str(tmp_path), "--out", str(tmp_path / "out.jsonl")])
    error_line(invoke(args + ["--device", "cpu", option, value]), words)


def test_cli_generate_equals_transformers_with_both_controls():
    """The options reach the sampler: facli generate on the random demo model gives the tokens
    of transformers' generate on the same checkpoint with the same settings."""
    import transformers

    from facli.models.resolve import resolve_model, tokenizer_for

    text = "abab abab abab cdcd"
    args = ["generate", "--prompt", text, "--max-new-tokens", "24", "--device", "cpu", "--json",
            "--repetition-penalty", "1.3", "--no-repeat-ngram-size", "2"]
    result = invoke(args)
    assert result.exit_code == 0, result.stderr
    got = json.loads(result.stdout.strip().splitlines()[-1])["token_ids"]
    assert len(got) == 24  # no EOS before the end: every token is compared
    resolved = resolve_model("random-demo")
    reference = transformers.AutoModelForCausalLM.from_pretrained(resolved.path,
                                                                   dtype=torch.float32).eval()
    reference.generation_config.eos_token_id = None
    prompt = torch.tensor([tokenizer_for(resolved)(text).input_ids])
    params = SamplingParams(repetition_penalty=1.3, no_repeat_ngram_size=2)
    assert got == _hf_generate(reference, prompt, params, 24)


@pytest.mark.slow
def test_summarize_takes_the_controls_and_pins_its_output_to_them(tmp_path):
    """Summaries with the controls differ from those without; the manifest records them, and
    resuming the output with another penalty is refused in one line."""
    docs = tmp_path / "docs"
    docs.mkdir()
    for index in range(2):
        (docs / f"doc{index}.txt").write_text(f"Item {index}: the the the cat cat sat sat. " * 3)
    common = ["summarize", docs, "--ctx", "512", "--max-new-tokens", "10", "--device", "cpu",
              "--batch", "2"]
    controls = ["--repetition-penalty", "1.3", "--no-repeat-ngram-size", "2"]
    summaries = {}
    for name, extra in (("plain", []), ("controlled", controls)):
        out = tmp_path / f"{name}.jsonl"
        result = invoke(common + ["--out", out] + extra)
        assert result.exit_code == 0, result.stderr
        summaries[name] = {record["id"]: record["summary"]
                           for record in map(json.loads, out.read_text().splitlines())}
    assert summaries["plain"].keys() == summaries["controlled"].keys()
    assert all(summaries["plain"][key] != summaries["controlled"][key]
               for key in summaries["plain"])
    settings = json.loads((tmp_path / "controlled.manifest.json").read_text())["settings"]
    assert (settings["repetition_penalty"], settings["no_repeat_ngram_size"]) == (1.3, 2)
    again = invoke(common + ["--out", tmp_path / "controlled.jsonl", "--repetition-penalty", "1.2",
                             "--no-repeat-ngram-size", "2"])
    error_line(again, "repetition_penalty", "1.3", "1.2", alone=False)
