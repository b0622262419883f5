"""GGUF files: converted once through transformers' own GGUF reader, then loaded like any
checkpoint; facli's logits on the converted folder equal transformers' on the GGUF file."""

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")  # a dependency; a lane without it skips
from gguf_files import write_tiny_gguf
from facli.errors import FacliError
from facli.models.checkpoint import CheckpointReader
from facli.models.config import ModelConfig
from facli.models.gguf_checkpoint import (
    CONVERTED,
    converted_checkpoint,
    gguf_file_in,
    inspect_gguf,
)
from facli.models.llama import CausalLM
from facli.models.tokenizer import load_tokenizer
from facli.offload.device_cache import DeviceKVCache
from facli.run.engine import Engine


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf")
    return write_tiny_gguf(folder / "tiny-q8.gguf", quant="Q8_0")


@pytest.fixture(scope="module")
def converted(tiny, tmp_path_factory):
    return converted_checkpoint(tiny, tmp_path_factory.mktemp("cache"))


def test_logits_match_transformers_reading_the_gguf(tiny, converted):
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(str(tiny.parent), gguf_file=tiny.name,
                                                     dtype=torch.float32).eval()
    config = ModelConfig.from_dir(converted)
    model = CausalLM(config, dtype=torch.float32, device="cpu")
    model.load(CheckpointReader(converted))
    ids = torch.randint(0, config.vocab_size, (1, 37))
    cache = DeviceKVCache(config.num_hidden_layers, 1, 64, config.num_key_value_heads,
                          config.head_dim, torch.float32, torch.device("cpu"))
    with torch.no_grad():
        expected = reference(ids).logits[:, -1].float()
        actual = Engine(model, cache, prefill_chunk=16).prefill(ids)
    assert ((actual - expected).norm() / expected.norm()).item() < 1e-5


def test_tokenizer_and_chat_template_come_from_the_file(tiny, converted):
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(str(tiny.parent), gguf_file=tiny.name)
    ours = load_tokenizer(converted)
    text = "hello world, hello"
    assert ours(text).input_ids == reference(text).input_ids
    messages = [{"role": "user", "content": "hi"}]
    assert ours.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_second_conversion_is_the_cached_folder(tiny, converted, capsys):
    stamp = (converted / CONVERTED).stat().st_mtime_ns
    again = converted_checkpoint(tiny, converted.parent.parent)
    assert again == converted
    assert (converted / CONVERTED).stat().st_mtime_ns == stamp
    assert "converting" not in capsys.readouterr().err


def test_changed_file_converts_anew_and_half_written_folder_is_ignored(tmp_path):
    source = write_tiny_gguf(tmp_path / "m.gguf", quant="F32", seed=1)
    cache = tmp_path / "cache"
    first = converted_checkpoint(source, cache)
    (first / CONVERTED).unlink()  # as if the conversion had stopped before its last file
    rebuilt = converted_checkpoint(source, cache)
    assert rebuilt == first and (first / CONVERTED).exists()
    write_tiny_gguf(source, quant="F32", seed=2)
    assert converted_checkpoint(source, cache) != first
    assert not [p for p in (cache / "gguf").iterdir() if p.name.startswith(".convert-")]


def test_folder_with_one_gguf(tiny, tmp_path):
    assert gguf_file_in(tiny.parent) == tiny
    assert gguf_file_in(tiny) == tiny
    (tmp_path / "a.gguf").write_bytes(tiny.read_bytes())
    (tmp_path / "b.gguf").write_bytes(tiny.read_bytes())
    with pytest.raises(FacliError, match="expected one .gguf file"):
        gguf_file_in(tmp_path)
    (tmp_path / "a.gguf").unlink()
    (tmp_path / "b.gguf").unlink()
    (tmp_path / "config.json").write_text("{}")
    assert gguf_file_in(tmp_path) is None


def test_not_a_gguf_file(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(FacliError, match="expected a GGUF file"):
        inspect_gguf(fake)


def test_truncated_gguf(tiny, tmp_path):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny.read_bytes()[:3000])
    with pytest.raises(FacliError, match="damaged or truncated"):
        inspect_gguf(cut)


def test_unsupported_architecture(tmp_path):
    path = write_tiny_gguf(tmp_path / "other.gguf", architecture="gpt2", quant="F32")
    with pytest.raises(FacliError, match="architecture .*'gpt2'"):
        inspect_gguf(path)


def test_encoding_gguf_cannot_dequantize(tmp_path):
    path = tmp_path / "q81.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    block, type_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_1]
    writer.add_tensor("token_embd.weight", np.zeros((8, 64 // block * type_bytes), np.uint8),
                      raw_dtype=gguf.GGMLQuantizationType.Q8_1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(FacliError, match="Q8_1"):
        inspect_gguf(path)
