"""Model recipes: real architecture values, comments on every value, where weights are found."""

import json
import re
from importlib import resources

import pytest

from facli.errors import FacliError
from facli.models.config import ModelConfig
from facli.models.recipe_loader import (
    list_hardware_recipes,
    list_model_recipes,
    load_model_recipe,
    read_recipe,
    resolve_model_config,
    resolve_weights_dir,
)

MODELS = ("llama-7b", "llama-2-7b", "llama-2-13b", "llama-3-8b", "mistral-7b", "qwen2-7b")

# (layers, hidden, intermediate, heads, kv heads, vocab, parameters in billions)
ARCHITECTURE = {
    "llama-7b": (32, 4096, 11008, 32, 32, 32000, 6.74),
    "llama-2-7b": (32, 4096, 11008, 32, 32, 32000, 6.74),
    "llama-2-13b": (40, 5120, 13824, 40, 40, 32000, 13.02),
    "llama-3-8b": (32, 4096, 14336, 32, 8, 128256, 8.03),
    "mistral-7b": (32, 4096, 14336, 32, 8, 32000, 7.24),
    "qwen2-7b": (28, 3584, 18944, 28, 4, 152064, 7.62),
}


def test_every_listed_model_has_a_recipe():
    assert set(MODELS) <= set(list_model_recipes())


@pytest.mark.parametrize("name", MODELS)
def test_recipe_architecture_matches_the_published_checkpoint(name):
    config = load_model_recipe(name).config
    layers, hidden, inter, heads, kv_heads, vocab, billions = ARCHITECTURE[name]
    got = (config.num_hidden_layers, config.hidden_size, config.intermediate_size,
           config.num_attention_heads, config.num_key_value_heads, config.vocab_size)
    assert got == (layers, hidden, inter, heads, kv_heads, vocab)
    assert config.head_dim == 128
    assert config.num_parameters() / 1e9 == pytest.approx(billions, abs=0.01)


def test_recipe_specifics():
    llama = load_model_recipe("llama-7b").config
    assert (llama.max_position_embeddings, llama.rope_theta, llama.torch_dtype) == (2048, 1e4, "float16")
    llama3 = load_model_recipe("llama-3-8b").config
    assert llama3.rope_theta == 500000.0 and llama3.rope_scaling.rope_type == "default"
    mistral = load_model_recipe("mistral-7b").config
    assert mistral.model_type == "mistral" and mistral.sliding_window == 4096
    qwen = load_model_recipe("qwen2-7b").config
    assert qwen.attention_bias and qwen.sliding_window is None and qwen.rope_theta == 1e6


def _value_lines(kind: str):
    folder = resources.files("facli.recipes").joinpath(kind)
    for entry in folder.iterdir():
        if entry.name.endswith(".toml"):
            for number, line in enumerate(entry.read_text().splitlines(), 1):
                if re.match(r"^\s*[A-Za-z_][\w-]*\s*=", line):
                    yield f"{kind}/{entry.name}:{number}", line


@pytest.mark.parametrize("kind", ["models", "hardware"])
def test_every_recipe_value_has_a_comment(kind):
    bare = [where for where, line in _value_lines(kind) if "#" not in line]
    assert not bare, bare


@pytest.mark.parametrize("name", MODELS)
def test_weights_locations_are_named(name):
    recipe = load_model_recipe(name)
    assert recipe.weights_env.startswith("FACLI_")
    assert recipe.default_path.startswith("~/")


def test_unknown_model_recipe_lists_the_valid_ones():
    with pytest.raises(FacliError) as error:
        load_model_recipe("llama-99b")
    assert "llama-7b" in str(error.value) and "qwen2-7b" in str(error.value)


def _checkpoint(path, config: dict):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_weights_from_the_environment_variable(tmp_path, monkeypatch):
    recipe = load_model_recipe("llama-7b")
    directory = _checkpoint(tmp_path / "weights", {"model_type": "llama"})
    monkeypatch.setenv(recipe.weights_env, str(directory))
    assert resolve_weights_dir(recipe) == directory


def test_weights_variable_pointing_nowhere_says_so(tmp_path, monkeypatch):
    recipe = load_model_recipe("llama-7b")
    monkeypatch.setenv(recipe.weights_env, str(tmp_path / "missing"))
    with pytest.raises(FacliError) as error:
        resolve_weights_dir(recipe)
    assert recipe.weights_env in str(error.value) and "missing" in str(error.value)


def test_absent_weights_say_where_to_put_them(tmp_path, monkeypatch):
    recipe = load_model_recipe("mistral-7b")
    monkeypatch.delenv(recipe.weights_env, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(FacliError) as error:
        resolve_weights_dir(recipe)
    message = str(error.value)
    assert str(tmp_path / ".cache/facli/models/mistral-7b") in message
    assert recipe.weights_env in message and "config.json" in message


def test_weights_at_the_default_path(tmp_path, monkeypatch):
    recipe = load_model_recipe("qwen2-7b")
    monkeypatch.delenv(recipe.weights_env, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    directory = _checkpoint(tmp_path / ".cache/facli/models/qwen2-7b", {"model_type": "qwen2"})
    assert resolve_weights_dir(recipe) == directory


def test_model_option_takes_a_directory_or_a_recipe(tmp_path):
    raw = {"model_type": "llama", "vocab_size": 100, "hidden_size": 64, "intermediate_size": 96,
           "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2}
    name, config = resolve_model_config(str(_checkpoint(tmp_path / "tiny", raw)))
    assert name == "tiny" and config == ModelConfig.from_dict(raw)
    name, config = resolve_model_config("llama-3-8b")
    assert name == "llama-3-8b" and config.num_key_value_heads == 8
    with pytest.raises(FacliError, match="none of these"):
        resolve_model_config(str(tmp_path / "not-there"))


HARDWARE = ("1xA100-80GB", "1xH100-80GB", "1xH200-141GB", "1xRTX4090-24GB", "2xH200-141GB",
            "8xA100-80GB", "8xH200-141GB", "8xV100-32GB")
DESCRIPTION = re.compile(r"(\d+) x NVIDIA (.+?) (\d+) GB, (.+), (\d+) CPU cores, (\d+) GiB host memory"
                         r"( \(.+\))?")


def test_hardware_recipes_listed():
    assert set(HARDWARE) == set(list_hardware_recipes())


@pytest.mark.parametrize("name", HARDWARE)
def test_a_hardware_name_and_its_description_say_the_same_hardware(name):
    """Names are <count>x<GPU>-<memory>GB; the description is about the hardware alone:
    GPUs, link, CPU cores and host memory, agreeing with the recipe's own values."""
    raw = read_recipe("hardware", name)
    count, gpu, gigabytes = re.fullmatch(r"(\d+)x([A-Z0-9]+)-(\d+)GB", name, re.I).groups()
    words = DESCRIPTION.fullmatch(raw["description"])
    assert words, raw["description"]
    assert int(words[1]) == raw["count"] == int(count)
    assert gpu in words[2].replace(" ", "") and words[3] == gigabytes
    assert int(words[6]) == raw["host"]["ram_gib"]


@pytest.mark.parametrize(("old", "new"), [("2xH200", "2xH200-141GB"), ("8xH200", "8xH200-141GB")])
def test_the_former_hardware_names_still_name_their_recipes(old, new):
    from facli.planner.hardware import load_hardware

    assert load_hardware(old).name == new


def test_recipe_functions_import_from_the_recipes_package():
    from facli import recipes

    assert recipes.load_model_recipe("llama-7b").name == "llama-7b"
    assert recipes.resolve_weights_dir is resolve_weights_dir
