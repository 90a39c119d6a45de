"""Hostile Hugging Face checkpoints (issue 17): safetensors headers and offsets are bounds-checked with errors naming
the file and the values (a huge header length, garbage JSON, offsets past the end, a byte length that disagrees with
dtype x shape, overlapping tensors), and tensors the config does not use are an error unless ``allow_unused=True``
(a config with fewer layers than the weights no longer loads silently)."""

import json
import os
import struct

import numpy as np
import pytest

from mllm_jax.hf.safetensors_io import CheckpointReader, SafetensorsFile, write_file


def _raw(path, header_bytes: bytes, data: bytes = b"", length: int | None = None):
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes) if length is None else length) + header_bytes + data)
    return str(path)


def _header(tensors: dict) -> bytes:
    return json.dumps(tensors).encode()


@pytest.mark.parametrize("case,match", [
    ("huge_length", r"header length 4611686018427387904 .*larger than the file"),
    ("garbage_json", r"header is not valid JSON"),
    ("not_a_dict", r"header must be a JSON object"),
    ("past_end", r"tensor 'w'.*data_offsets \[0, 4096\].*past the end of the data \(16 bytes"),
    ("wrong_length", r"tensor 'w'.*F32 \[2, 3\] needs 24 bytes.*data_offsets \[0, 16\] hold 16"),
    ("bad_dtype", r"tensor 'w'.*unsupported dtype 'Q99'"),
    ("overlap", r"tensors 'a' and 'b' overlap"),
    ("short_file", r"shorter than the 8-byte header length"),
])
def test_safetensors_header_is_bounds_checked(tmp_path, case, match):
    p = tmp_path / "model.safetensors"
    data16 = bytes(16)
    if case == "huge_length":
        path = _raw(p, b"{}", length=2**62)
    elif case == "garbage_json":
        path = _raw(p, b"\xff\xfe{not json", data16)
    elif case == "not_a_dict":
        path = _raw(p, b"[1, 2]", data16)
    elif case == "past_end":
        path = _raw(p, _header({"w": {"dtype": "F32", "shape": [32, 32], "data_offsets": [0, 4096]}}), data16)
    elif case == "wrong_length":
        path = _raw(p, _header({"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 16]}}), data16)
    elif case == "bad_dtype":
        path = _raw(p, _header({"w": {"dtype": "Q99", "shape": [4], "data_offsets": [0, 16]}}), data16)
    elif case == "overlap":
        path = _raw(p, _header({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 12]},
                                "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}), data16)
    else:
        with open(p, "wb") as f:
            f.write(b"\x01\x02")
        path = str(p)
    with pytest.raises(ValueError, match=match) as info:
        SafetensorsFile(path)
    assert path in str(info.value)


def test_a_valid_file_still_reads(tmp_path):
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    write_file(str(tmp_path / "model.safetensors"), {"w": w, "b": np.ones(3, np.float32)})
    np.testing.assert_array_equal(CheckpointReader(str(tmp_path)).get("w"), w)


def test_unused_checkpoint_tensors_are_an_error_unless_allowed(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import dataclasses

    from mllm_jax.hf import config_map as cm
    from mllm_jax.hf import load_pretrained
    from mllm_jax.hf.pretrained import read_config

    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=48, max_position_embeddings=64))
    path = str(tmp_path / "llama")
    hf.save_pretrained(path)
    fewer = dataclasses.replace(cm.config_from_hf(read_config(path)), n_layers=1)
    with pytest.raises(ValueError, match=r"n_layers=1\) does not use .*model.layers.1.*allow_unused=True"):
        load_pretrained(path, config=fewer)
    model = load_pretrained(path, config=fewer, allow_unused=True)
    assert model.config.n_layers == 1
    # An extra tensor under the model's own prefix is refused too (a stray or renamed weight).
    from mllm_jax.hf.safetensors_io import SafetensorsFile as SF

    f = SF(os.path.join(path, "model.safetensors"))
    tensors = {k: np.array(f.get(k)) for k in f.keys()}
    tensors["model.layers.0.mlp.extra_proj.weight"] = np.zeros((2, 2), np.float32)
    write_file(os.path.join(path, "model.safetensors"), tensors)
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.extra_proj.weight"):
        load_pretrained(path)
