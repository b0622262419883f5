"""One command-line surface: shared options read and mean the same in every command, help
without type placeholders, `--version`, `auto` wherever a count is, and the README's examples."""

import inspect
import json
import re
import shlex
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from facli.cli import app
from facli.models.recipe_loader import load_model_recipe
from facli.models.resolve import check_context
from facli.planner.hardware import load_hardware
from facli.planner.search import PlanOptions, plan
from facli.run_options import KV_DTYPES
from facli.units import parse_ctx

README = Path(__file__).resolve().parents[2] / "README.md"
COMMANDS = ("generate", "plan-memory", "summarize", "perplexity", "bench", "recipes")
# stdout and stderr apart: the default from click 8.2 on, an argument before it.
runner = CliRunner(**({"mix_stderr": False}
                      if "mix_stderr" in inspect.signature(CliRunner.__init__).parameters else {}))


def commands() -> dict:
    group = typer.main.get_command(app)
    return {name: group.commands[name] for name in COMMANDS}


def options_of(command) -> dict:
    return {opt: param for param in command.params for opt in param.opts if opt.startswith("--")}


@pytest.fixture
def demo_cache(tmp_path_factory, monkeypatch):
    cache = tmp_path_factory.getbasetemp() / "surface-cache"
    cache.mkdir(exist_ok=True)
    monkeypatch.setenv("FACLI_CACHE", str(cache))
    return cache


def last_json(output: str) -> dict:
    return json.loads(output.strip().splitlines()[-1])


def test_an_option_that_several_commands_take_has_one_help_text():
    seen: dict[str, dict[str, str]] = {}
    for name, command in commands().items():
        for opt, param in options_of(command).items():
            seen.setdefault(opt, {})[name] = param.help
    shared = {opt: helps for opt, helps in seen.items() if len(helps) > 1}
    # What the brief asks to share, at the least; every one of them in more than one command.
    for opt in ("--model", "--ctx", "--device", "--devices", "--dtype", "--kv-dtype",
                "--decode-mode", "--allreduce-tile-tokens", "--prefill-chunk",
                "--allow-ctx-extension", "--batch", "--hardware", "--temperature", "--top-p",
                "--top-k", "--seed", "--max-new-tokens", "--json"):
        assert opt in shared, opt
    differing = {opt: helps for opt, helps in shared.items() if len(set(helps.values())) > 1}
    assert not differing


def test_json_is_a_flag_in_every_command():
    for name, command in commands().items():
        param = options_of(command)["--json"]
        assert param.is_flag and not param.secondary_opts, name


@pytest.mark.parametrize("width", ["80", "200"])
@pytest.mark.parametrize("args", [[], *([name] for name in COMMANDS)], ids=lambda a: a[0] if a else "facli")
def test_help_shows_no_type_placeholders(args, width):
    result = runner.invoke(app, [*args, "--help"], env={"COLUMNS": width, "TERMINAL_WIDTH": width})
    assert result.exit_code == 0, result.output
    assert "--help" in result.stdout and "Usage: facli" in result.stdout
    assert "<" not in result.stdout and "list[" not in result.stdout, result.stdout


def test_list_options_and_arguments_show_their_metavars():
    wide = {"COLUMNS": "200", "TERMINAL_WIDTH": "200"}
    generate = runner.invoke(app, ["generate", "--help"], env=wide).stdout
    assert re.search(r"--stop +TEXT ", generate)
    summarize = runner.invoke(app, ["summarize", "--help"], env=wide).stdout
    assert re.search(r"Usage: facli summarize \[OPTIONS\] \{?PATH\b", summarize)
    assert re.search(r"\* +(inputs +)?PATH +Files and folders", summarize)


def test_version_is_the_installed_packages():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout == f"facli {version('facli')}\n"


# Shows facli's help and every command's, then names the heavy packages that got imported.
HELP_IMPORTS = """
import sys
from typer.testing import CliRunner
from facli.cli import app
for args in ([], *([name] for name in sys.argv[1:])):
    assert CliRunner().invoke(app, [*args, "--help"]).exit_code == 0, args
heavy = ("torch", "transformers", "safetensors", "triton", "numpy")
print(",".join(name for name in heavy if name in sys.modules) or "none")
"""


@pytest.mark.slow
def test_help_starts_without_torch():
    """Help imports no torch or transformers: each command imports its work when it runs."""
    result = subprocess.run([sys.executable, "-P", "-c", HELP_IMPORTS, *COMMANDS],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "none"


@pytest.mark.slow
def test_kv_dtype_help_and_error_name_what_is_accepted(demo_cache):
    """The help names every value the runtime's check accepts, and a refused value's error
    lists the same; a named dtype other than the weights' is refused as the help says."""
    help_text = options_of(commands()["generate"])["--kv-dtype"].help
    named = set(re.findall(r"\b(auto|bf16|fp16|fp32|fp8|int\d)\b", help_text))
    assert named == set(KV_DTYPES)
    bad = runner.invoke(app, ["generate", "--prompt", "x", "--device", "cpu", "--kv-dtype", "int4"])
    assert bad.exit_code == 1
    listed = re.fullmatch(r"facli: error: expected --kv-dtype one of (.+), got 'int4'\n", bad.stderr)
    assert listed and set(listed[1].split(", ")) == set(KV_DTYPES)
    # The demo runs in fp32 on the CPU: fp32 names the weights' dtype, bf16 does not.
    args = ["generate", "--prompt", "kv", "--device", "cpu", "--max-new-tokens", "2", "--json"]
    same = runner.invoke(app, [*args, "--kv-dtype", "fp32"])
    assert same.exit_code == 0, same.output
    other = runner.invoke(app, [*args, "--kv-dtype", "bf16"])
    assert other.exit_code == 1
    assert other.stderr.splitlines()[-1] == ("facli: error: expected --kv-dtype equal to the weight "
                                             "dtype (fp32) or fp8, got bf16")


@pytest.mark.slow
def test_generate_devices_auto_is_one_rank_on_the_cpu(demo_cache):
    args = ["generate", "--prompt", "ranks", "--device", "cpu", "--max-new-tokens", "2", "--json"]
    auto = runner.invoke(app, [*args, "--devices", "auto"])
    assert auto.exit_code == 0, auto.output
    one = runner.invoke(app, args)
    assert last_json(auto.stdout)["devices"] == 1
    assert last_json(auto.stdout)["token_ids"] == last_json(one.stdout)["token_ids"]
    wrong = runner.invoke(app, [*args, "--devices", "0"])
    assert wrong.exit_code == 1
    assert wrong.stderr == ("facli: error: expected --devices a number from 1 to 2147483648, or "
                            "auto, got '0'\n")


@pytest.fixture
def documents(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    for index in range(3):
        (folder / f"{index}.txt").write_text(f"Document {index}. " + "words " * (10 + 20 * index))
    return folder


def test_summarize_batch_and_devices_take_auto(demo_cache, documents, tmp_path):
    """--batch auto is the planner's choice (what leaving it out gives); --devices auto is the
    planner's degree, one rank on the CPU; both plan the same as the defaults here."""
    base = ["summarize", str(documents), "--out", str(tmp_path / "s.jsonl"), "--plan-only",
            "--device", "cpu", "--ctx", "512", "--max-new-tokens", "8", "--json"]
    default = runner.invoke(app, base)
    assert default.exit_code == 0, default.output
    auto = runner.invoke(app, [*base, "--batch", "auto", "--devices", "auto"])
    assert auto.exit_code == 0, auto.output
    assert last_json(auto.stdout) == last_json(default.stdout)
    assert max(g["rows"] for g in last_json(default.stdout)["groups"]) > 1
    two = runner.invoke(app, [*base, "--batch", "2"])
    assert [g["rows"] for g in last_json(two.stdout)["groups"]] == [2]
    wrong = runner.invoke(app, [*base, "--batch", "lots"])
    assert wrong.exit_code == 1 and "expected --batch a number from 1" in wrong.stderr
    assert not (tmp_path / "s.jsonl").exists()


def test_a_one_device_plan_prints_no_allreduce_tile(demo_cache, documents, tmp_path):
    config, spec = load_model_recipe("llama-7b").config, load_hardware("1xH200-141GB")
    one = plan(config, spec, 32 * 1024, 1, PlanOptions(model_name="llama-7b"))
    assert one.tp == 1 and "tile" not in one.summary_line().lower()
    only = runner.invoke(app, ["summarize", str(documents), "--out", str(tmp_path / "s.jsonl"),
                               "--plan-only", "--device", "cpu", "--ctx", "512"])
    assert only.exit_code == 0, only.output
    assert "tile" not in only.output.lower() and "allreduce" not in only.output.lower()


def readme_commands() -> list[list[str]]:
    """Every `facli ...` command in README.md: lines of its bash blocks and inline code spans."""
    text = README.read_text()
    found = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.splitlines():
            found += [part.strip() for part in line.split("&&") if part.strip().startswith("facli ")]
    found += re.findall(r"`(facli [^`]+)`", text)
    commands = [shlex.split(command, comments=True) for command in found]
    # A bare `facli generate` in prose names the command; those that need no input run alone.
    return [words for words in commands if len(words) > 2 or words[1] in ("recipes", "plan-memory")]


# Directories in README examples, and the recipe whose architecture they hold.
README_DIRECTORIES = {"/data/Llama-2-7b-hf": "llama-2-7b"}


def test_readme_names_commands_of_every_kind():
    kinds = {words[1] for words in readme_commands() if len(words) > 1}
    assert {"generate", "plan-memory", "recipes", "summarize", "bench"} <= kinds


@pytest.mark.parametrize("words", readme_commands(), ids=lambda words: " ".join(words))
def test_readme_example_runs_as_written(words, demo_cache):
    """plan-memory and recipes run here as written, with no warning. A command that needs
    weights or documents is parsed as written, and its --ctx passes the check a run makes."""
    args = words[1:]
    if not args or args[0] in ("plan-memory", "recipes"):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        assert "warning" not in result.stderr and "error" not in result.stderr, result.stderr
        return
    command = commands()[args[0]]
    context = command.make_context(args[0], list(args[1:]))  # unknown options raise here
    values = context.params
    if values.get("ctx") and values.get("model"):
        model = README_DIRECTORIES.get(values["model"], values["model"])
        check_context(load_model_recipe(model).config, parse_ctx(values["ctx"]),
                      values["allow_ctx_extension"], warn=False)
