"""Bad checkpoints get one clear line naming what is wrong."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from checkpoints import build_checkpoint
from facli.errors import FacliError
from facli.models.checkpoint import CheckpointReader, Shard
from facli.models.config import ModelConfig
from facli.models.llama import CausalLM


@pytest.fixture()
def checkpoint(tmp_path):
    build_checkpoint(tmp_path, "llama")
    return tmp_path


def _load(directory):
    model = CausalLM(ModelConfig.from_dir(directory), dtype=torch.float32, device="cpu")
    model.load(CheckpointReader(directory))
    return model


def test_missing_config(tmp_path):
    with pytest.raises(FacliError, match="config.json"):
        ModelConfig.from_dir(tmp_path)


def test_unsupported_model_type(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(FacliError, match="llama, mistral, qwen2.*'gpt2'"):
        ModelConfig.from_dir(checkpoint)


def test_unsupported_rope_scaling(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    config.pop("rope_parameters", None)
    config["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    (checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(FacliError, match="rope_scaling type .*'yarn'"):
        ModelConfig.from_dir(checkpoint)


def test_truncated_safetensors(checkpoint):
    path = checkpoint / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(FacliError, match="truncated"):
        _load(checkpoint)


def test_corrupt_header(checkpoint):
    path = checkpoint / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:40] = b"\xff" * 32
    path.write_bytes(bytes(data))
    with pytest.raises(FacliError, match="corrupt"):
        _load(checkpoint)


def test_missing_tensor_is_named(checkpoint):
    path = checkpoint / "model.safetensors"
    tensors = load_file(path)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(FacliError, match="model.layers.1.mlp.up_proj.weight.*missing"):
        _load(checkpoint)


def test_wrong_shape_names_both(checkpoint):
    path = checkpoint / "model.safetensors"
    tensors = load_file(path)
    tensors["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(8, 8)
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(FacliError, match=r"q_proj.weight.*\(64, 64\).*\(8, 8\)"):
        _load(checkpoint)


def test_sharded_checkpoint_loads_like_single_file(tmp_path):
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    model = build_checkpoint(single, "llama")
    model.save_pretrained(sharded, max_shard_size="60KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    ids = torch.randint(0, 384, (1, 9))
    from facli.offload.device_cache import DeviceKVCache

    outputs, weights = [], []
    for directory in (single, sharded):
        loaded = _load(directory)
        config = loaded.config
        cache = DeviceKVCache(config.num_hidden_layers, 1, 16, config.num_key_value_heads,
                              config.head_dim, torch.float32, torch.device("cpu"))
        outputs.append(loaded(ids, 0, cache))
        weights.append(loaded.state_dict())
    assert weights[0].keys() == weights[1].keys()
    for name, tensor in weights[0].items():
        assert torch.equal(tensor, weights[1][name]), name
    # The same weights at other addresses: the CPU's GEMMs may take other code paths (alignment),
    # so the logits agree to float32 rounding rather than bit for bit.
    torch.testing.assert_close(outputs[0], outputs[1])


def test_shard_reads_only_a_slice(checkpoint):
    reader = CheckpointReader(checkpoint)
    full = reader.read("model.layers.0.mlp.down_proj.weight", (64, 160), torch.float32, "cpu")
    part = reader.read("model.layers.0.mlp.down_proj.weight", (64, 160), torch.float32, "cpu",
                       Shard(dim=1, rank=1, world=2))
    assert part.shape == (64, 80)
    torch.testing.assert_close(part, full[:, 80:])


def test_mistral_sliding_window_limits_ctx(tmp_path):
    build_checkpoint(tmp_path, "mistral", num_key_value_heads=2, sliding_window=256)
    config = ModelConfig.from_dir(tmp_path)
    config.check_sliding_window(256)
    with pytest.raises(FacliError, match="sliding_window \\(256\\).*got 257"):
        config.check_sliding_window(257)


def test_generation_config_adds_end_of_turn_ids(tmp_path):
    """Ids that only generation_config.json names end generation too, as in transformers."""
    build_checkpoint(tmp_path, "llama")
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 9]}))
    assert ModelConfig.from_dir(tmp_path).eos_token_ids == (2, 9)
    (tmp_path / "generation_config.json").write_text("{not json")
    with pytest.raises(FacliError, match="generation_config.json"):
        ModelConfig.from_dir(tmp_path)


@pytest.mark.parametrize("header", [b'{"a": 5}', b'{"a": {"data_offsets": [8, "x"]}}', b"[1, 2]",
                                    b'{"a": {"data_offsets": [9, 1]}}'],
                         ids=["entry-not-object", "offset-not-number", "list", "offsets-reversed"])
def test_a_header_of_the_wrong_shape_is_corrupt(tmp_path, header):
    path = tmp_path / "model.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 16)
    with pytest.raises(FacliError, match="expected a JSON header in safetensors file .* corrupt"):
        CheckpointReader(tmp_path)


def test_a_header_past_the_safetensors_limit_is_corrupt(tmp_path):
    path = tmp_path / "model.safetensors"
    with open(path, "wb") as handle:
        handle.write((150_000_000).to_bytes(8, "little"))
        handle.truncate(200_000_000)  # sparse: nothing of it is read
    with pytest.raises(FacliError, match="header of at most 100000000 bytes .* got 150000000"):
        CheckpointReader(tmp_path)
