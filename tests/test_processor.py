"""The multimodal processor against its oracles: HF image processors and WhisperFeatureExtractor (transformers, PIL
backend), transformers encoders for the feature counts, and the contract-batch invariants."""

import json

import numpy as np
import pytest

from mllm_jax.config import AudioConfig, ModelConfig, ProjectorConfig, VisionConfig
from mllm_jax.data.processor import (
    IGNORE,
    ImageProcessor,
    MultimodalProcessor,
    WhisperFeatures,
    load_tokenizer,
)

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")


def _image(h, w, seed=0):
    return (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)


@pytest.mark.parametrize("h,w", [(37, 53), (64, 30), (20, 20)])
def test_clip_pixels_match_hf(h, w):
    hf = transformers.CLIPImageProcessorPil(size={"shortest_edge": 20}, crop_size={"height": 16, "width": 16})
    ref = hf(images=[_image(h, w)], return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    ours = ImageProcessor(kind="clip", size=20, crop_size=16)(_image(h, w))
    assert ours.shape == ref.shape == (16, 16, 3)
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_siglip_pixels_match_hf():
    hf = transformers.SiglipImageProcessorPil(size={"height": 24, "width": 24})
    ref = hf(images=[_image(37, 53)], return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    ours = ImageProcessor.for_model(VisionConfig(kind="siglip", image_size=24, patch_size=8))(_image(37, 53))
    np.testing.assert_allclose(ours, ref, atol=1e-5)


@pytest.mark.parametrize("cls", ["CLIPImageProcessorPil", "SiglipImageProcessorPil"])
def test_image_processor_from_saved_hf_config(tmp_path, cls):
    kw = {"size": {"shortest_edge": 18}, "crop_size": {"height": 14, "width": 14}} if "CLIP" in cls else {
        "size": {"height": 14, "width": 14}, "image_mean": [0.1, 0.2, 0.3]}
    hf = getattr(transformers, cls)(**kw)
    hf.save_pretrained(tmp_path)
    ref = hf(images=[_image(33, 21)], return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    np.testing.assert_allclose(ImageProcessor.from_pretrained(str(tmp_path))(_image(33, 21)), ref, atol=1e-5)


def test_image_processor_missing_config_names_path(tmp_path):
    with pytest.raises(ValueError, match="preprocessor_config.json"):
        ImageProcessor.from_pretrained(str(tmp_path))


@pytest.mark.parametrize("seconds,n_mels", [(2.5, 80), (31.0, 128)])
def test_log_mel_matches_whisper_feature_extractor(seconds, n_mels):
    wav = (np.random.default_rng(1).standard_normal(int(16000 * seconds)) * 0.1).astype(np.float32)
    hf = transformers.WhisperFeatureExtractor(feature_size=n_mels)
    ref = hf(wav, sampling_rate=16000, return_tensors="np")["input_features"][0].T  # [frames, mels]
    ours = WhisperFeatures(n_mels=n_mels)(wav)
    assert ours.shape == ref.shape == (3000, n_mels)
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_feature_counts_match_transformers_encoders():
    clip = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, image_size=24, patch_size=8))
    siglip = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
        hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, image_size=24, patch_size=8))
    whisper = transformers.WhisperModel(transformers.WhisperConfig(
        d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=16, decoder_ffn_dim=16, num_mel_bins=8, max_source_positions=10, max_target_positions=8,
        vocab_size=16, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)).encoder
    with torch.no_grad():
        n_clip = clip(torch.zeros(1, 3, 24, 24)).last_hidden_state.shape[1]
        n_siglip = siglip(torch.zeros(1, 3, 24, 24)).last_hidden_state.shape[1]
        n_audio = whisper(torch.zeros(1, 8, 20)).last_hidden_state.shape[1]

    def cfg(enc, proj=None):
        return ModelConfig(encoders={"m": enc}, projectors={"m": proj or ProjectorConfig()}, placeholder_ids={"m": 5})

    def count(enc, proj=None):
        return cfg(enc, proj).features_per_instance("m")

    assert count(VisionConfig(kind="clip", image_size=24, patch_size=8, drop_class_token=False)) == n_clip
    assert count(VisionConfig(kind="clip", image_size=24, patch_size=8)) == n_clip - 1  # LLaVA
    assert count(VisionConfig(kind="siglip", image_size=24, patch_size=8, class_token=False)) == n_siglip
    assert count(AudioConfig(n_mels=8, max_source_positions=10)) == n_audio
    assert count(AudioConfig(), ProjectorConfig(kind="resampler", num_queries=7)) == 7


# ---------------------------------------------------------------------------------------------- contract batches

WORDS = ["<pad>", "<s>", "</s>", "<image>", "<audio>", "USER:", "ASSISTANT:", "what", "is", "this", "a", "cat",
         "tone", "hear"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return load_tokenizer(str(path.parent))


def _mm_config():
    return ModelConfig(
        encoders={"vision": VisionConfig(kind="clip", image_size=16, patch_size=8),  # 4 tokens (class dropped)
                  "audio": AudioConfig(n_mels=8, max_source_positions=100)},  # 2 s of audio -> 100 tokens
        projectors={"vision": ProjectorConfig(), "audio": ProjectorConfig(kind="resampler", num_queries=3)},
        placeholder_ids={"vision": 3, "audio": 4},
    )


def _conv(question, answer, media):
    return [{"role": "user", "content": [*media, {"type": "text", "text": question}]},
            {"role": "assistant", "content": answer}]


def test_batch_contract(tokenizer):
    cfg = _mm_config()
    proc = MultimodalProcessor(tokenizer, cfg, template="llava")
    img0, img1 = _image(20, 30, 1), _image(40, 16, 2)
    wav = np.sin(np.arange(32000) / 5.0).astype(np.float32)
    convs = [
        _conv("what is this", "a cat", [{"type": "image", "image": img0}, {"type": "image", "image": img1}]),
        _conv("what hear", "a tone", [{"type": "audio", "audio": wav}]),
        _conv("what is this", "cat", []),
    ]
    batch = proc(convs, seq_len=24, pack=True, instances={"vision": 2, "audio": 1})
    ids, labels = batch["input_ids"], batch["labels"]
    # sample 0 alone (22 tokens), samples 1 (3 + 3 audio + ...) and 2 packed into row 1
    assert ids.shape == (2, 24)
    assert sorted(set(batch["segment_ids"][1]) - {0}) == [1, 2]
    # text and placeholders as the template says
    row0 = [WORDS[t] for t in ids[0][batch["segment_ids"][0] == 1]]
    assert row0 == ["<s>", "USER:"] + ["<image>"] * 8 + ["what", "is", "this", "ASSISTANT:", "a", "cat", "</s>"]
    # labels: next token, only on the answer ("a cat </s>"), shifted on the host
    trained = [(WORDS[ids[0, t]], WORDS[labels[0, t]]) for t in range(24) if labels[0, t] != IGNORE]
    assert trained == [("ASSISTANT:", "a"), ("a", "cat"), ("cat", "</s>")]
    # positions restart per packed segment; padding has segment 0 and no label
    for r in range(2):
        for seg in set(batch["segment_ids"][r]) - {0}:
            np.testing.assert_array_equal(batch["positions"][r][batch["segment_ids"][r] == seg],
                                          np.arange((batch["segment_ids"][r] == seg).sum()))
    assert (labels[batch["segment_ids"] == 0] == IGNORE).all()
    # placeholders <-> features: every placeholder points at a distinct feature of its own instance, in order
    for name, pid, t in (("vision", 3, 4), ("audio", 4, 3)):
        fi = batch["feature_index"][name]
        np.testing.assert_array_equal(fi >= 0, ids == pid)
        assert len(set(fi[fi >= 0])) == (ids == pid).sum()
        for r in range(2):
            assert (fi[r][fi[r] >= 0] // t < (r + 1) * batch["encoder_inputs"][name].shape[0] // 2).all()
    # encoder rows: sample-major, processed like the HF processors / feature extractor
    np.testing.assert_allclose(batch["encoder_inputs"]["vision"][0], ImageProcessor(size=16, crop_size=16)(img0))
    np.testing.assert_allclose(batch["encoder_inputs"]["vision"][1], ImageProcessor(size=16, crop_size=16)(img1))
    assert batch["encoder_inputs"]["audio"].shape == (2, 200, 8)
    np.testing.assert_allclose(batch["encoder_inputs"]["audio"][1], WhisperFeatures(n_mels=8, chunk_seconds=2)(wav))
    assert not batch["encoder_inputs"]["audio"][0].any()  # row 0 has no audio: its slot stays zero
    # one span per media instance, covering exactly its placeholder run
    span = batch["span_ids"]
    assert sorted(set(span[0]) - {0}) == [1, 2] and (span[0] == 1).sum() == 4 and (span[1] == 1).sum() == 3


def test_causal_media_and_errors(tokenizer):
    cfg = _mm_config()
    conv = _conv("what", "a", [{"type": "image", "image": _image(16, 16)}])
    batch = MultimodalProcessor(tokenizer, cfg, template="llava", bidirectional_media=False)([conv], seq_len=16)
    assert not batch["span_ids"].any()
    proc = MultimodalProcessor(tokenizer, cfg, template="llava")
    with pytest.raises(ValueError, match="sample 0 has 10 tokens, more than seq_len=8"):
        proc([conv], seq_len=8)
    with pytest.raises(ValueError, match=r"row 0 holds 1 'vision' instances; the budget instances\['vision'\] is 0"):
        proc([conv], seq_len=16, instances={"vision": 0})
    with pytest.raises(ValueError, match="unknown chat template 'nope'"):
        MultimodalProcessor(tokenizer, cfg, template="nope")
    with pytest.raises(ValueError, match="tokenizer file not found"):
        load_tokenizer("/nonexistent/dir")


def test_batch_passes_check_batch_when_available(tokenizer):
    batch_mod = pytest.importorskip("mllm_jax.batch")
    cfg = _mm_config()
    conv = _conv("what is this", "a cat", [{"type": "image", "image": _image(16, 16)}])
    batch_mod.check_batch(MultimodalProcessor(tokenizer, cfg, template="llava")([conv, conv], seq_len=20), cfg)


def test_chatml_template_text():
    from mllm_jax.data.processor import get_template

    pieces = get_template("chatml").render([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
    assert "".join(p.text for p in pieces) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>"
    assert [p.text for p in pieces if p.train] == ["yo", "<|im_end|>"]
    json.dumps([p.text for p in pieces])  # plain strings
