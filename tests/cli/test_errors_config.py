"""Malformed checkpoint files (config.json, generation_config.json, tokenizer files, the
weight index) are one `facli: error:` line naming the file, the field and what it takes; every
read of them is bounded."""

import json
import shutil

import pytest
import transformers

from checkpoints import BASE, build_checkpoint
from cli_errors import error_line, invoke
from facli.errors import FacliError
from facli.models.config import ModelConfig
from facli.models.demo import byte_level_tokenizer

CONFIG = {"model_type": "llama", **BASE, "head_dim": 16, "rope_theta": 10000.0,
          "tie_word_embeddings": False, "torch_dtype": "float32"}


def plan_memory(directory):
    return invoke(["plan-memory", "--model", directory, "--ctx", "1k", "--hardware",
                   "1xA100-80GB"])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A small llama checkpoint with the demo's byte-level tokenizer files."""
    directory = tmp_path_factory.mktemp("checkpoint")
    build_checkpoint(directory, "llama")
    byte_level_tokenizer().save_pretrained(str(directory))
    return directory


@pytest.fixture()
def copy(checkpoint, tmp_path):
    target = tmp_path / "model"
    shutil.copytree(checkpoint, target)
    return target


def generate(directory):
    return invoke(["generate", "--model", directory, "--prompt", "hi", "--device", "cpu",
                   "--max-new-tokens", "2"])


def test_the_fixture_checkpoint_runs(copy):
    result = generate(copy)
    assert result.exit_code == 0, result.stderr


FIELD_CASES = [
    ("hidden_size", "big", "hidden_size", "'big' (a string)"),
    ("hidden_size", 64.0, "hidden_size", "64.0 (a number with a decimal point)"),
    ("hidden_size", True, "hidden_size", "true (a boolean)"),
    ("hidden_size", None, "hidden_size", "got null"),
    ("hidden_size", -64, "hidden_size", "-64 (a whole number)"),
    ("vocab_size", 0, "vocab_size", "a whole number from 1"),
    ("num_hidden_layers", [2], "num_hidden_layers", "[2] (a list)"),
    ("num_key_value_heads", 3, "num_attention_heads", "a multiple of num_key_value_heads (3)"),
    ("max_position_embeddings", 2**40, "max_position_embeddings", "from 1 to 2147483647"),
    ("rms_norm_eps", "small", "rms_norm_eps", "a finite number > 0"),
    ("rope_theta", -1.0, "rope_theta", "a finite number > 0"),
    ("rope_scaling", [1, 2], "rope_scaling", "an object"),
    ("rope_scaling", {"rope_type": "llama3", "factor": "8"}, "rope_scaling.factor", "'8'"),
    ("rope_scaling", {"rope_type": "linear", "factor": 0}, "rope_scaling.factor", "> 0"),
    ("rope_scaling", {"rope_type": "llama3", "factor": 8.0,
                      "original_max_position_embeddings": 8192.5},
     "rope_scaling.original_max_position_embeddings", "8192.5"),
    ("rope_scaling", {"rope_type": 3}, "rope_scaling.rope_type", "a string"),
    ("rope_parameters", "default", "rope_parameters", "an object"),
    ("eos_token_id", [2, "x"], "eos_token_id", "a token id"),
    ("bos_token_id", -1, "bos_token_id", "from 0 to"),
    ("tie_word_embeddings", "no", "tie_word_embeddings", "true or false"),
    ("torch_dtype", 16, "torch_dtype", "a string"),
    ("head_dim", 0, "head_dim", "from 1 to"),
    ("sliding_window", "4k", "sliding_window", "'4k'"),
]


@pytest.mark.parametrize(("field", "value", "named", "words"), FIELD_CASES,
                         ids=[f"{field}={json.dumps(value)[:16]}" for field, value, *_ in FIELD_CASES])
def test_a_field_of_the_wrong_type_or_range_names_file_and_field(tmp_path, field, value, named, words):
    (tmp_path / "config.json").write_text(json.dumps({**CONFIG, field: value}))
    error_line(plan_memory(tmp_path), f"expected {named} in {tmp_path / 'config.json'}", words)


def test_hidden_size_must_split_into_the_heads_without_head_dim(tmp_path):
    config = {key: value for key, value in CONFIG.items() if key != "head_dim"}
    (tmp_path / "config.json").write_text(json.dumps({**config, "hidden_size": 66}))
    error_line(plan_memory(tmp_path), "hidden_size", "a multiple of num_attention_heads (4)")


def test_a_non_finite_number_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**CONFIG, "rope_theta": 1.0})
                                          .replace('"rope_theta": 1.0', '"rope_theta": NaN'))
    error_line(plan_memory(tmp_path), "rope_theta", "NaN")


@pytest.mark.parametrize(("text", "words"), [
    ("[1, 2]", ["expected a JSON object ({...})", "[1, 2] (a list)"]),
    ('"llama"', ["expected a JSON object", "(a string)"]),
    ("{not json", ["expected valid JSON", "parse error"]),
    ("[" * 100_000, ["expected valid JSON"]),
    (b"\xff\xfe{}", ["expected valid JSON"]),
    (json.dumps({"model_type": "llama", "vocab_size": 10}), ["hidden_size", "incomplete"]),
    (json.dumps({**CONFIG, "model_type": ["llama"]}), ["model_type one of", '["llama"] (a list)']),
], ids=["list", "string", "not-json", "deep", "not-utf8", "incomplete", "model-type-list"])
def test_a_config_that_is_no_json_object_is_one_line(tmp_path, text, words):
    (tmp_path / "config.json").write_bytes(text.encode() if isinstance(text, str) else text)
    error_line(plan_memory(tmp_path), str(tmp_path / "config.json"), *words)


def test_a_huge_config_is_refused_unread(tmp_path):
    with open(tmp_path / "config.json", "wb") as handle:
        handle.truncate(1 << 30)  # sparse: 1 GiB that takes no disk
    error_line(plan_memory(tmp_path), "config.json of at most 16.0 MiB", "1.0 GiB")


def test_a_config_json_folder_is_named_as_a_folder(tmp_path):
    (tmp_path / "config.json").mkdir()
    error_line(plan_memory(tmp_path), "found none", "is a directory")


@pytest.mark.parametrize(("text", "words"), [
    ("[2]", ["expected a JSON object", "generation_config.json"]),
    ('{"eos_token_id": "2"}', ["eos_token_id in", "generation_config.json", "'2' (a string)"]),
    ('{"eos_token_id": [2, 3.5]}', ["eos_token_id in", "generation_config.json"]),
])
def test_generation_config_is_checked_too(tmp_path, text, words):
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    (tmp_path / "generation_config.json").write_text(text)
    error_line(plan_memory(tmp_path), *words)


@pytest.mark.parametrize(("name", "text", "words"), [
    ("tokenizer.json", "{}", ["could not load them", "KeyError"]),
    ("tokenizer.json", "[1]", ["could not load them"]),
    ("tokenizer_config.json", "[]", ["could not load them"]),
    ("tokenizer_config.json", "garbage", ["could not load them"]),
])
def test_broken_tokenizer_files_are_one_line(copy, name, text, words):
    (copy / name).write_text(text)
    error_line(generate(copy), f"in {copy}", *words)


def test_a_huge_tokenizer_file_is_refused_unread(copy):
    with open(copy / "tokenizer.json", "r+b") as handle:
        handle.truncate(1 << 30)
    error_line(generate(copy), "tokenizer file tokenizer.json of at most 256.0 MiB", "1.0 GiB")


@pytest.mark.parametrize(("index", "words"), [
    ([], ["expected a JSON object", "model.safetensors.index.json"]),
    ({"metadata": {}}, ["expected a weight_map", "got null"]),
    ({"weight_map": {"model.norm.weight": "../model.safetensors"}}, ["expected a weight_map"]),
    ({"weight_map": {"model.norm.weight": 7}}, ["expected a weight_map"]),
])
def test_a_malformed_weight_index_is_one_line(copy, index, words):
    (copy / "model.safetensors").rename(copy / "weights.safetensors")
    (copy / "model.safetensors.index.json").write_text(json.dumps(index))
    error_line(generate(copy), *words, alone=False)


def test_a_recipe_source_is_named():
    with pytest.raises(FacliError, match="expected hidden_size in model recipe tiny to be"):
        ModelConfig.from_dict({**CONFIG, "hidden_size": "4k"}, "model recipe tiny")


def test_configs_as_transformers_writes_them_still_load(tmp_path):
    """transformers' own files: rope_parameters (5.x) with llama3 scaling, lists of eos ids,
    and nulls where a value is optional."""
    config = transformers.LlamaConfig(
        **BASE, rope_scaling={"rope_type": "llama3", "factor": 8, "low_freq_factor": 1,
                              "high_freq_factor": 4, "original_max_position_embeddings": 512},
    )
    config.eos_token_id = [2, 5]
    config.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw.update(head_dim=None, num_key_value_heads=None, bos_token_id=None)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    loaded = ModelConfig.from_dir(tmp_path)
    assert loaded.rope_scaling.rope_type == "llama3" and loaded.rope_scaling.factor == 8.0
    assert loaded.eos_token_ids == (2, 5) and loaded.bos_token_id is None
    assert loaded.head_dim == BASE["hidden_size"] // BASE["num_attention_heads"]
    assert loaded.num_key_value_heads == BASE["num_attention_heads"]
