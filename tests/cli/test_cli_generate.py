"""`facli generate` end to end through the console script, and its user errors."""

import json
import os
import subprocess
import sys

import pytest

from checkpoints import build_checkpoint

FACLI = [sys.executable, "-P", "-m", "facli.cli"]  # -P: the repo root stays off sys.path


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return {**os.environ, "FACLI_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}


def facli(args, env, **kwargs):
    # Run away from the repository root, where ./facli would shadow the installed package.
    kwargs.setdefault("cwd", env["FACLI_CACHE"])
    return subprocess.run(FACLI + args, env=env, capture_output=True, text=True, timeout=300, **kwargs)


@pytest.mark.slow
def test_demo_model_generates_json(env):
    result = facli(["generate", "--prompt", "Hello there", "--max-new-tokens", "12", "--json",
                    "--device", "cpu"], env)
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(payload["token_ids"]) == 12
    assert payload["prompt_tokens"] == len("Hello there")
    assert payload["peak_gpu_bytes"] is None
    assert payload["ttft_s"] > 0 and payload["decode_tokens_per_s"] > 0
    assert payload["plan"]["decode_mode"] == "resident" and payload["plan"]["host_cpu_share"] == 0.0


@pytest.mark.slow
def test_two_gloo_ranks_with_a_chosen_allreduce_tile_match_one_process(env):
    common = ["generate", "--prompt", "Tiles of three tokens", "--max-new-tokens", "6", "--json",
              "--device", "cpu", "--prefill-chunk", "8"]
    one = facli(common, env)
    two = facli(common + ["--devices", "2", "--allreduce-tile-tokens", "3"], env)
    assert one.returncode == 0 and two.returncode == 0, (one.stderr, two.stderr)
    single, tiled = (json.loads(r.stdout.strip().splitlines()[-1]) for r in (one, two))
    assert tiled["plan"]["allreduce_tile_tokens"] == 3 and tiled["devices"] == 2
    assert tiled["token_ids"] == single["token_ids"]
    bad = facli(common + ["--allreduce-tile-tokens", "0"], env)
    assert bad.returncode == 1 and "--allreduce-tile-tokens a whole number from 1" in bad.stderr


@pytest.mark.slow
def test_a_short_prompt_in_a_large_context_gets_its_own_predictions(env):
    large = facli(["generate", "--prompt", "hello", "--max-new-tokens", "3", "--ctx", "200000",
                   "--device", "cpu", "--json"], env)
    assert large.returncode == 0, large.stderr
    assert "facli: this prompt (5 tokens): first token ~" in large.stderr
    payload = json.loads(large.stdout.strip().splitlines()[-1])["plan"]
    assert payload["prompt_ttft_s"] < payload["ttft_s"] / 100
    fitting = facli(["generate", "--prompt", "hello", "--max-new-tokens", "3", "--device", "cpu"], env)
    assert fitting.returncode == 0 and "this prompt" not in fitting.stderr


@pytest.mark.slow
def test_greedy_is_deterministic_and_sampling_follows_seed(env):
    def run(*extra):
        out = facli(["generate", "--prompt", "abc", "--max-new-tokens", "10", "--json",
                     "--device", "cpu", *extra], env)
        return json.loads(out.stdout.strip().splitlines()[-1])["token_ids"]

    assert run() == run()
    assert run("--temperature", "1", "--seed", "5") == run("--temperature", "1", "--seed", "5")
    assert run("--temperature", "1", "--seed", "5") != run("--temperature", "1", "--seed", "6")


@pytest.mark.slow
def test_text_streams_to_stdout(env):
    result = facli(["generate", "--prompt", "Hi", "--max-new-tokens", "8", "--device", "cpu"], env)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.strip()) > 0


@pytest.fixture(scope="module")
def short_model(tmp_path_factory):
    directory = tmp_path_factory.mktemp("short")
    build_checkpoint(directory, "llama", max_position_embeddings=64)
    from facli.models.demo import byte_level_tokenizer

    byte_level_tokenizer().save_pretrained(str(directory))
    return directory


def _one_line_error(result, pattern):
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert pattern in lines[0], lines[0]


@pytest.mark.parametrize("ctx", ["256q", "0", "-1"], ids=["letters", "zero", "negative"])
@pytest.mark.slow
def test_bad_ctx(env, ctx):
    _one_line_error(facli(["generate", "--prompt", "x", f"--ctx={ctx}"], env), "context length")


@pytest.mark.slow
def test_prompt_longer_than_ctx(env):
    _one_line_error(facli(["generate", "--prompt", "x" * 50, "--ctx", "16", "--device", "cpu"], env),
                    "shorter than --ctx")


@pytest.mark.slow
def test_ctx_beyond_trained_length_needs_flag(env, short_model):
    args = ["generate", "--model", str(short_model), "--prompt", "hi", "--ctx", "128",
            "--device", "cpu", "--max-new-tokens", "2"]
    _one_line_error(facli(args, env), "max_position_embeddings")
    allowed = facli(args + ["--allow-ctx-extension"], env)
    assert allowed.returncode == 0, allowed.stderr
    assert "warning" in allowed.stderr


@pytest.mark.slow
def test_empty_and_non_utf8_prompt_files(env, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    _one_line_error(facli(["generate", "--prompt-file", str(empty)], env), "empty")
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9".encode("latin-1"))
    _one_line_error(facli(["generate", "--prompt-file", str(latin)], env), "UTF-8")


@pytest.mark.slow
def test_missing_model_directory(env, tmp_path):
    _one_line_error(facli(["generate", "--model", str(tmp_path / "nope"), "--prompt", "x"], env),
                    "does not exist")
    _one_line_error(facli(["generate", "--model", str(tmp_path), "--prompt", "x"], env), "config.json")


def test_the_prompt_line_names_where_host_rows_go_for_this_prompt():
    """Llama-7B planned for 256K on one H200: 4 host layers decoded in split mode. A 1K prompt
    keeps their rows in the staging slots, and the line says so; a 200K prompt is near enough
    the plan's own figures for no line."""
    from facli.generation import _prompt_line
    from facli.planner.hardware import load_hardware
    from facli.planner.search import PlanOptions, plan, predict_prompt
    from facli.models.recipe_loader import load_model_recipe

    config, spec = load_model_recipe("llama-7b").config, load_hardware("1xH200-141GB")
    result = plan(config, spec, 256 * 1024, 1, PlanOptions(model_name="llama-7b"))
    short = predict_prompt(config, spec, result, 1024, choose_mode=True)
    line = _prompt_line(result, 1024, short)
    assert line.startswith("this prompt (1024 tokens): first token ~")
    assert "(the host layers' rows all fit on the GPU for it)" in line
    long = predict_prompt(config, spec, result, 200_000, choose_mode=True)
    assert _prompt_line(result, 200_000, long) is None


CHAT_TEMPLATE = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}</{{ m.role }}>{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")
NO_SYSTEM_TEMPLATE = ("{% if messages[0].role == 'system' %}{{ raise_exception('no system role') }}"
                      "{% endif %}" + CHAT_TEMPLATE)


def _chat_tokenizer(template=CHAT_TEMPLATE):
    from facli.models.demo import byte_level_tokenizer

    tokenizer = byte_level_tokenizer()
    tokenizer.chat_template = template
    return tokenizer


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    directory = tmp_path_factory.mktemp("chat")
    build_checkpoint(directory, "llama")
    _chat_tokenizer().save_pretrained(str(directory))
    return directory


def _json_run(env, args, **kwargs):
    result = facli(["generate", "--max-new-tokens", "4", "--json", "--device", "cpu"] + args, env,
                   **kwargs)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_prompt_from_standard_input(env):
    piped = _json_run(env, ["--prompt-file", "-"], input="Hello there")
    given = _json_run(env, ["--prompt", "Hello there"])
    assert piped["prompt_tokens"] == len("Hello there")
    assert piped["token_ids"] == given["token_ids"]
    _one_line_error(facli(["generate", "--prompt-file", "-"], env, input=""), "standard input is empty")


@pytest.mark.parametrize("system", [None, "Answer in one word."])
@pytest.mark.slow
def test_chat_prompt_is_the_tokenizers_own_chat_rendering(env, chat_model, system):
    messages = ([{"role": "system", "content": system}] if system else [])
    messages.append({"role": "user", "content": "What is facli?"})
    tokenizer = _chat_tokenizer()
    expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    args = ["--model", str(chat_model), "--prompt", "What is facli?", "--chat"]
    with_chat = facli(["generate", "--max-new-tokens", "4", "--json", "--device", "cpu"] + args
                      + (["--system", system] if system else []), env)
    assert with_chat.returncode == 0 and "chat template" not in with_chat.stderr
    chat = json.loads(with_chat.stdout.strip().splitlines()[-1])
    assert chat["prompt_tokens"] == len(expected["input_ids"])
    plain = facli(["generate", "--max-new-tokens", "4", "--json", "--device", "cpu", "--model",
                   str(chat_model), "--prompt", rendered], env)
    assert json.loads(plain.stdout.strip().splitlines()[-1])["token_ids"] == chat["token_ids"]
    assert "hint: this model has a chat template; --chat" in plain.stderr


@pytest.mark.slow
def test_chat_needs_a_template_and_system_needs_chat(env):
    _one_line_error(facli(["generate", "--prompt", "x", "--chat", "--device", "cpu"], env),
                    "chat template for --chat")
    _one_line_error(facli(["generate", "--prompt", "x", "--system", "s", "--device", "cpu"], env),
                    "--system together with --chat")


def test_a_template_that_refuses_the_messages_is_a_user_error():
    from facli.errors import FacliError
    from facli.models.tokenizer import chat_prompt_ids

    tokenizer = _chat_tokenizer(NO_SYSTEM_TEMPLATE)
    assert chat_prompt_ids(tokenizer, "hi") == tokenizer.encode("<user>hi</user><assistant>",
                                                                add_special_tokens=False)
    with pytest.raises(FacliError, match="chat template refused the messages: no system role"):
        chat_prompt_ids(tokenizer, "hi", system="be brief")


@pytest.mark.slow
def test_stop_strings_end_the_text_before_them_on_one_rank_and_on_two(env):
    common = ["generate", "--prompt", "Hello there", "--max-new-tokens", "12", "--device", "cpu"]
    free = json.loads(facli(common + ["--json"], env).stdout.strip().splitlines()[-1])
    text = free["text"]
    stop = text[5:7]  # greedy text of the demo model: the stop appears, first at text.find(stop)
    expected = text[:text.find(stop)]
    stopped = facli(common + ["--json", "--stop", stop, "--stop", "never seen"], env)
    payload = json.loads(stopped.stdout.strip().splitlines()[-1])
    assert payload["text"] == expected and payload["finish_reason"] == "stop"
    assert payload["token_ids"] == free["token_ids"][:len(payload["token_ids"])]
    assert len(payload["token_ids"]) < 12
    streamed = facli(common + ["--stop", stop], env)
    assert streamed.returncode == 0 and streamed.stdout == expected + "\n"
    two = facli(common + ["--json", "--stop", stop, "--devices", "2"], env)
    assert json.loads(two.stdout.strip().splitlines()[-1])["token_ids"] == payload["token_ids"]
    first = json.loads(facli(common + ["--json", "--stop", text[0]], env).stdout.strip().splitlines()[-1])
    assert first["text"] == "" and first["token_ids"] == free["token_ids"][:1]
    _one_line_error(facli(common + ["--stop", ""], env), "non-empty --stop")


@pytest.mark.slow
def test_an_end_of_turn_id_from_generation_config_ends_generation(env, tmp_path):
    build_checkpoint(tmp_path, "llama")
    from facli.models.demo import byte_level_tokenizer

    byte_level_tokenizer().save_pretrained(str(tmp_path))
    (tmp_path / "generation_config.json").unlink(missing_ok=True)
    args = ["--model", str(tmp_path), "--prompt", "Hello there", "--max-new-tokens", "8"]
    free = _json_run(env, args)["token_ids"]
    end = free[2]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [end]}))
    ended = _json_run(env, args)
    assert ended["finish_reason"] == "eos" and ended["token_ids"] == free[:free.index(end) + 1]
