"""Readers: LLaVA conversation JSON + images, JSONL audio captions (.wav / .npy), and every bad-data case under both
policies."""

import json
import logging
import os

import numpy as np
import pytest

from mllm_jax.data.datasets import BadSampleError, Loader, make_source
from mllm_jax.data.datasets.media import load_audio, log_mel
from mllm_jax.data.datasets.sample import IGNORE
from test_datasets_helpers import (T_AUDIO, T_VISION, byte_tokenizer, dataset_config, decode_bytes,
                                   tiny_model_config, write_llava, write_wav)

MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def test_llava_tokens_targets_labels_and_images(tmp_path):
    path, values = write_llava(str(tmp_path), n=6)
    cfg = dataset_config(path, media_root=str(tmp_path / "images"))
    src = make_source(cfg, byte_tokenizer, tiny_model_config())
    records = json.load(open(path))
    for i, rec in enumerate(records):
        p = src.prepare(i)
        ids, tgt = p.input_ids, p.target_mask
        # Oracle: the template rendered as a string, with each <image> as T placeholder tokens.
        text, want_tgt = "<bos>", [False] * 5
        for turn in rec["conversations"]:
            marker = "<assistant>" if turn["from"] == "gpt" else "<user>"
            text += marker
            want_tgt += [False] * len(marker)
            for j, piece in enumerate(turn["value"].split("<image>")):
                if j:
                    text += "\x00" * T_VISION
                    want_tgt += [False] * T_VISION
                text += piece
                want_tgt += [turn["from"] == "gpt"] * len(piece)
            if turn["from"] == "gpt":
                text += "<eos>"
                want_tgt += [True] * 5
        is_ph = ids == 3
        got = "".join("\x00" if ph else decode_bytes([t]) for t, ph in zip(ids, is_ph))
        assert got == text
        np.testing.assert_array_equal(tgt, want_tgt)
        n_img = len(values.get(rec["id"], []))
        assert is_ph.sum() == n_img * T_VISION and len(p.instances) == n_img
        labels = p.labels()
        for t in range(len(ids) - 1):
            assert labels[t] == (ids[t + 1] if tgt[t + 1] else IGNORE)
        assert labels[-1] == IGNORE
        sample = src.materialize(p)
        for arr, rgb in zip(sample.encoder_inputs, values.get(rec["id"], [])):
            want = (np.asarray(rgb, np.float32) / 255 - np.asarray(MEAN, np.float32)) / np.asarray(STD, np.float32)
            np.testing.assert_allclose(arr, np.broadcast_to(want, (8, 8, 3)), rtol=1e-5, atol=1e-5)


def _write_audio(tmp):
    rng = np.random.default_rng(0)
    mel = rng.standard_normal((5, 8)).astype(np.float32)  # shorter than num_frames=8: padded with its minimum
    np.save(os.path.join(tmp, "a.npy"), mel)
    wav = 0.3 * np.sin(2 * np.pi * 440 * np.arange(2000) / 16000)
    write_wav(os.path.join(tmp, "b.wav"), wav)
    np.save(os.path.join(tmp, "c.npy"), rng.standard_normal((4, 3)))  # wrong n_mels
    with open(os.path.join(tmp, "d.wav"), "wb") as f:
        f.write(b"RIFF....not a wav")
    lines = [{"id": "a", "audio": "a.npy", "caption": "hello"}, {"id": "b", "audio": "b.wav", "caption": "tone"},
             {"id": "c", "audio": "c.npy", "caption": "bad"}, {"id": "d", "audio": "d.wav", "caption": "bad"},
             {"id": "e", "audio": "missing.wav", "caption": "bad"}]
    path = os.path.join(tmp, "audio.jsonl")
    with open(path, "w") as f:
        f.write("\n".join(json.dumps(x) for x in lines) + "\n{not json\n")
    return path, mel, wav


def test_audio_caption_reader(tmp_path):
    path, mel, wav = _write_audio(str(tmp_path))
    mc = tiny_model_config("audio")
    src = make_source(dataset_config(path, format="audio_caption"), byte_tokenizer, mc)
    assert len(src) == 6
    a = src.materialize(src.prepare(0))
    want = np.full((8, 8), mel.min(), np.float32)
    want[:5] = mel
    np.testing.assert_array_equal(a.encoder_inputs[0], want)
    p = src.prepare(0)
    assert (p.input_ids == 4).sum() == T_AUDIO
    assert decode_bytes(p.input_ids[p.target_mask][:-5]) == "hello"  # caption then <eos>
    b = src.materialize(src.prepare(1)).encoder_inputs[0]
    quantised = np.trunc(np.clip(wav, -1, 1) * 32767) / 32768  # what the 16-bit file holds
    np.testing.assert_allclose(b, log_mel(quantised, n_mels=8, num_frames=8), atol=1e-4)
    with pytest.raises(BadSampleError, match="bad_audio_shape"):
        src.materialize(src.prepare(2))
    with pytest.raises(BadSampleError, match="corrupt_file"):
        src.materialize(src.prepare(3))
    with pytest.raises(BadSampleError, match="missing_file"):
        src.prepare(4)
    with pytest.raises(BadSampleError, match="malformed_record"):
        src.prepare(5)


def test_log_mel_matches_transformers_whisper(tmp_path):
    transformers = pytest.importorskip("transformers")
    fe = transformers.WhisperFeatureExtractor(feature_size=80, chunk_length=1)
    x = 0.1 * np.random.default_rng(1).standard_normal(12000)
    write_wav(str(tmp_path / "x.wav"), x)
    ours = load_audio(str(tmp_path / "x.wav"), "x", n_mels=80, num_frames=100)
    quantised = (np.trunc(np.clip(x, -1, 1) * 32767) / 32768).astype(np.float32)
    ref = fe(quantised, sampling_rate=16000, return_tensors="np").input_features[0].T
    np.testing.assert_allclose(ours, ref, atol=1e-4)


BAD_CASES = {"missing": ("bad_missing", "missing_file"), "corrupt": ("bad_corrupt", "corrupt_file"),
             "mismatch": ("bad_mismatch", "placeholder_mismatch"), "too_long": ("bad_long", "too_long")}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
@pytest.mark.parametrize("policy", ["skip", "raise"])
def test_bad_llava_sample(tmp_path, case, policy, caplog):
    sid, reason = BAD_CASES[case]
    path, _ = write_llava(str(tmp_path), n=3, bad=(case,))
    cfg = dataset_config(path, media_root=str(tmp_path / "images"), on_bad_sample=policy, shuffle=False,
                         global_batch_samples=4, rows_per_microbatch=4,
                         instance_buckets=(4, 16))
    mc = tiny_model_config()
    with Loader(make_source(cfg, byte_tokenizer, mc), cfg, mc, num_data_ranks=1, microbatches=1,
                process_index=0, process_count=1) as loader:
        if policy == "raise":
            with pytest.raises(BadSampleError, match=reason) as err:
                next(loader)
            assert err.value.sample_id == sid
            return
        with caplog.at_level(logging.WARNING):
            next(loader)  # 3 good + the bad one (the 4th record) -> the batch wraps into epoch 1
        ids = loader.last_sample_ids[0][0]
        # Planning-time rejects are replaced by the next record (wrapping into epoch 1: s0); a decode failure
        # leaves its slot empty.
        assert sorted(ids) == sorted(["s0", "s1", "s2"] + ([] if case == "corrupt" else ["s0"]))
        assert loader.bad_sample_counts == {reason: 1}
        assert loader.state()["bad_samples"] == {reason: 1}
    assert any(sid in r.getMessage() and reason in r.getMessage() for r in caplog.records)
