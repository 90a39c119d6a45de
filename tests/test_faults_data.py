"""Hostile dataset input (issue 17): media paths that escape ``media_root`` (relative ``..`` and absolute) are
skipped as ``path_outside_root`` and never opened; images larger than ``DatasetConfig.max_image_pixels`` (checked
from the header) and decompression bombs are skipped as ``image_too_large``; broken JSON and non-UTF-8 files are a
ValueError naming the file and the line, raised by the training run before any model is built."""

import json
import os
import struct
import zlib

import gin
import pytest

from mllm_jax.data.datasets import BadSampleError, make_source
from mllm_jax.data.datasets.config import DatasetConfig
from mllm_jax.data.datasets.media import load_image
from test_datasets_helpers import byte_tokenizer, colour_png, dataset_config, tiny_model_config


def _record(sid, image):
    return {"id": sid, "image": image,
            "conversations": [{"from": "human", "value": "<image>x"}, {"from": "gpt", "value": "y"}]}


def _llava(tmp_path, records):
    path = tmp_path / "data" / "llava.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records))
    return str(path)


def test_media_paths_must_stay_under_media_root(tmp_path, monkeypatch):
    root = tmp_path / "data" / "images"
    root.mkdir(parents=True)
    colour_png(str(root / "ok.png"), (1, 2, 3))
    os.makedirs(tmp_path / "data" / "outside")
    colour_png(str(tmp_path / "data" / "outside" / "secret.png"), (9, 9, 9))  # exists: only the root check stops it
    path = _llava(tmp_path, [_record("ok", "ok.png"), _record("dotdot", "../outside/secret.png"),
                             _record("abs", str(tmp_path / "data" / "outside" / "secret.png")),
                             _record("etc", "/etc/passwd"), _record("sneaky", "sub/../../outside/secret.png")])
    opened = []
    real_isfile = os.path.isfile
    monkeypatch.setattr(os.path, "isfile", lambda p: opened.append(str(p)) or real_isfile(p))
    src = make_source(dataset_config(path, media_root=str(root)), byte_tokenizer, tiny_model_config())
    assert src.prepare(0).instances[0].media == str(root / "ok.png")
    for i, sid in enumerate(["dotdot", "abs", "etc", "sneaky"], start=1):
        with pytest.raises(BadSampleError) as info:
            src.prepare(i)
        assert info.value.reason == "path_outside_root" and info.value.sample_id == sid
        assert str(root) in str(info.value)
    assert not any("secret" in p or p == "/etc/passwd" for p in opened), opened  # never even stat'ed


def _bomb_png(path, width, height):
    """A tiny PNG whose header claims width x height (1-bit greyscale, zlib-compressed zeros: ~50 KB for 20000^2)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    row = b"\x00" + b"\x00" * ((width + 7) // 8)
    raw = zlib.compress(row * height, 9)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
                + chunk(b"IDAT", raw) + chunk(b"IEND", b""))


def test_oversized_images_and_decompression_bombs_are_skipped_from_the_header(tmp_path):
    bomb = str(tmp_path / "bomb.png")
    _bomb_png(bomb, 20000, 20000)  # 400 MP: PIL's own DecompressionBombError
    assert os.path.getsize(bomb) < 200_000
    big = str(tmp_path / "big.png")
    _bomb_png(big, 3000, 2000)  # 6 MP: over a 5 MP limit, under PIL's
    kw = dict(size=8, mean=(0.5,) * 3, std=(0.5,) * 3)
    for path, limit in ((bomb, 50_000_000), (big, 5_000_000)):
        with pytest.raises(BadSampleError) as info:
            load_image(path, "s", max_pixels=limit, **kw)
        assert info.value.reason == "image_too_large" and path in str(info.value), info.value
    assert load_image(big, "s", max_pixels=10_000_000, **kw).shape == (8, 8, 3)
    assert DatasetConfig().max_image_pixels == 50_000_000
    with pytest.raises(ValueError, match=r"DatasetConfig.max_image_pixels must be positive; got 0"):
        DatasetConfig(max_image_pixels=0).validate()


def test_loader_skips_a_bomb_and_counts_it(tmp_path):
    from mllm_jax.data.datasets import Loader

    root = tmp_path / "data" / "images"
    root.mkdir(parents=True)
    _bomb_png(str(root / "bomb.png"), 20000, 20000)
    records = [_record(f"g{i}", f"g{i}.png") for i in range(3)] + [_record("bomb", "bomb.png")]
    for i in range(3):
        colour_png(str(root / f"g{i}.png"), (i, i, i))
    path = _llava(tmp_path, records)
    cfg = dataset_config(path, media_root=str(root), shuffle=False, global_batch_samples=4, rows_per_microbatch=4,
                         seq_len_buckets=(64,), instance_buckets=(4,))
    mc = tiny_model_config()
    with Loader(make_source(cfg, byte_tokenizer, mc), cfg, mc, process_index=0, process_count=1) as loader:
        next(loader)
        assert loader.bad_sample_counts == {"image_too_large": 1}


@pytest.mark.parametrize("content,line,what", [
    ('[\n  {"id": "a",\n   "conversations": [}\n]\n', 3, "invalid JSON"),
    (b'[\n {"id": "a"},\n {"id": "\xff\xfe"}\n]\n', 3, "not valid UTF-8"),
])
def test_broken_dataset_files_name_file_and_line_before_the_model_is_built(tmp_path, monkeypatch, content, line,
                                                                           what):
    from mllm_jax.train import loop
    from tokenizers import Tokenizer, models

    path = tmp_path / "llava.json"
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    tok = tmp_path / "tokenizer.json"
    Tokenizer(models.WordLevel({"<pad>": 0, "<unk>": 1}, unk_token="<unk>")).save(str(tok))
    gin.clear_config()
    try:
        cfg = loop.load_run_config(["configs/vlm_tiny.gin"], [
            f'DatasetConfig.path = "{path}"', f'DataConfig.tokenizer_path = "{tok}"', "ParallelConfig.data = 8",
            "DatasetConfig.global_batch_samples = 8"])
    finally:
        gin.clear_config()

    def no_model(*a, **k):
        raise AssertionError("the model was built before the dataset file was read")

    monkeypatch.setattr(loop, "create_model", no_model)
    with pytest.raises(ValueError) as info:
        loop.run(cfg, str(tmp_path / "run"), log=lambda *_: None)
    msg = str(info.value)
    assert str(path) in msg and f"line {line}" in msg and what in msg, msg
    assert not os.path.exists(tmp_path / "run" / "config.gin")


def test_jsonl_utf8_error_names_file_and_line(tmp_path):
    path = tmp_path / "audio.jsonl"
    path.write_bytes(b'{"audio": "a.wav", "caption": "x"}\n{"audio": "b.wav", "caption": "\xc3\x28"}\n')
    with pytest.raises(ValueError, match=rf"{path}: line 2, column \d+: not valid UTF-8"):
        make_source(dataset_config(str(path), format="audio_caption"), byte_tokenizer, tiny_model_config("audio"))
