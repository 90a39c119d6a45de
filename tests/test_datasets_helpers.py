"""Shared tiny fixtures for the tests of mllm_jax.data.datasets (no tests here): a byte-level tokenizer, a tiny model
config, and writers of LLaVA JSON / audio JSONL files with real PNG, WAV and NPY media."""

import json
import os
import wave

import numpy as np
from PIL import Image

from mllm_jax.config import AudioConfig, LLMConfig, ModelConfig, ProjectorConfig, VisionConfig
from mllm_jax.data.datasets import DatasetConfig

BYTE_OFFSET = 16  # text ids 16..271; placeholders 3 (vision) and 4 (audio) never collide with text
T_VISION = 4  # (8 / 4) ** 2 patches, class token dropped
T_AUDIO = 4


def byte_tokenizer(text):
    return [BYTE_OFFSET + b for b in text.encode()]


def decode_bytes(ids):
    return bytes(int(i) - BYTE_OFFSET for i in ids).decode()


def tiny_model_config(modality="vision"):
    enc = {"vision": VisionConfig(image_size=8, patch_size=4, d_model=16, n_layers=1, n_heads=2, d_ff=32),
           "audio": AudioConfig(n_mels=8, max_source_positions=T_AUDIO, d_model=16, n_layers=1, n_heads=2, d_ff=32)}
    return ModelConfig(llm=LLMConfig(vocab_size=300, d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, d_ff=64),
                       encoders={modality: enc[modality]}, projectors={modality: ProjectorConfig()},
                       placeholder_ids={"vision": 3, "audio": 4})


def colour_png(path, value, size=8):
    """A constant-colour RGB PNG; value (r, g, b) in 0..255 identifies the image after decoding."""
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(path)


def image_value(k):
    return (10 + 3 * k % 240, 200 - 2 * k % 190, 7 * k % 250)


def write_llava(tmp, n=12, seed=0, bad=()):
    """n good samples with 0..3 images and varying text lengths; ``bad`` adds named bad records.
    Returns (json path, {sample id: [image values]})."""
    rng = np.random.default_rng(seed)
    folder = os.path.join(tmp, "images")
    os.makedirs(folder, exist_ok=True)
    records, values, k = [], {}, 0
    for i in range(n):
        n_img = int(rng.integers(0, 4))
        names = []
        for _ in range(n_img):
            colour_png(os.path.join(folder, f"im{k}.png"), image_value(k))
            names.append(f"im{k}.png")
            values.setdefault(f"s{i}", []).append(image_value(k))
            k += 1
        words = " ".join(["word"] * int(rng.integers(1, 12)))
        rec = {"id": f"s{i}", "conversations": [
            {"from": "human", "value": "<image>" * n_img + f"q{i} {words}"},
            {"from": "gpt", "value": f"a{i} {words}"}]}
        if i % 3 == 0:  # some two-turn conversations
            rec["conversations"] += [{"from": "human", "value": "more?"}, {"from": "gpt", "value": f"yes {i}"}]
        if n_img == 1:
            rec["image"] = names[0]
        elif n_img > 1:
            rec["image"] = names
        records.append(rec)
    if "missing" in bad:
        records.append({"id": "bad_missing", "image": "nope.png",
                        "conversations": [{"from": "human", "value": "<image>x"}, {"from": "gpt", "value": "y"}]})
    if "corrupt" in bad:
        with open(os.path.join(folder, "corrupt.png"), "wb") as f:
            f.write(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
        records.append({"id": "bad_corrupt", "image": "corrupt.png",
                        "conversations": [{"from": "human", "value": "<image>x"}, {"from": "gpt", "value": "y"}]})
    if "mismatch" in bad:
        colour_png(os.path.join(folder, "m1.png"), (1, 2, 3))
        records.append({"id": "bad_mismatch", "image": ["m1.png", "m1.png"],
                        "conversations": [{"from": "human", "value": "<image>x"}, {"from": "gpt", "value": "y"}]})
    if "too_long" in bad:
        records.append({"id": "bad_long", "conversations": [{"from": "human", "value": "z" * 600},
                                                            {"from": "gpt", "value": "y"}]})
    path = os.path.join(tmp, "llava.json")
    with open(path, "w") as f:
        json.dump(records, f)
    return path, values


def write_wav(path, x, rate=16000):
    with wave.open(path, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(x, -1, 1) * 32767).astype("<i2").tobytes())


def dataset_config(path, **kw):
    base = dict(path=path, global_batch_samples=4, rows_per_microbatch=2, seq_len_buckets=(64, 128, 256),
                instance_buckets=(2, 4, 8), num_workers=2, prefetch=2)
    base.update(kw)
    return DatasetConfig(**base)
