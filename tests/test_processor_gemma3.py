"""Gemma 3's processor (mllm_jax.data.processor.gemma3) against transformers' Gemma3ImageProcessorPil (pixels,
pan-and-scan crops, num_crops) and Gemma3Processor (the expanded token ids), with a tiny local tokenizer
(gemma3_testlib). The logits of the processor's batch through the imported model: test_hf_gemma3."""

import itertools

import numpy as np
import pytest
from PIL import Image

from gemma3_testlib import BOI, EOI, IMAGE, make_tokenizers
from mllm_jax.data.processor import MultimodalProcessor
from mllm_jax.data.processor.gemma3 import Gemma3ImageProcessor, Gemma3Prompt, pan_and_scan_grid

transformers = pytest.importorskip("transformers")
pytest.importorskip("torch")

PAS = dict(pan_and_scan_min_crop_size=8, pan_and_scan_max_num_crops=3, pan_and_scan_min_ratio_to_activate=1.5)


def _image(h, w, seed=0, c=3):
    return np.random.default_rng(seed).integers(0, 256, (h, w, c), dtype=np.uint8)


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    return make_tokenizers(tmp_path_factory.mktemp("gemma3_tok"))


def _hf_pixels(hf, images, **kw):
    out = hf(images=images, return_tensors="np", **kw)
    return out["pixel_values"].transpose(0, 2, 3, 1), list(out["num_crops"])


@pytest.mark.parametrize("min_crop,max_crops,ratio", [(8, 4, 1.2), (8, 3, 2.0), (30, 4, 1.2), (1, 2, 1.0)])
def test_pan_and_scan_grid_is_hf_on_every_size(min_crop, max_crops, ratio):
    """600 image sizes from 1 to 60 px a side (heights in steps of 3, widths of 2): our crop boxes cut exactly the arrays HF's
    pan_and_scan returns (an image coding each pixel's position, so a box off by one pixel differs)."""
    hf = transformers.Gemma3ImageProcessorPil()
    n_crops = set()
    for h, w in itertools.product(range(1, 61, 3), range(1, 61, 2)):
        coded_CHW = np.arange(h * w, dtype=np.int64).reshape(1, h, w)
        ref = hf.pan_and_scan(coded_CHW, pan_and_scan_min_crop_size=min_crop, pan_and_scan_max_num_crops=max_crops,
                              pan_and_scan_min_ratio_to_activate=ratio)
        boxes = pan_and_scan_grid(h, w, min_crop_size=min_crop, max_num_crops=max_crops,
                                  min_ratio_to_activate=ratio)
        assert len(boxes) == len(ref), (h, w)
        for (t, l, ch, cw), r in zip(boxes, ref):
            np.testing.assert_array_equal(coded_CHW[:, t:t + ch, l:l + cw], r, err_msg=f"{h}x{w}")
        n_crops.add(len(boxes))
    assert max(n_crops) >= 2  # the sizes do get cut


@pytest.mark.parametrize("pan_and_scan", [False, True])
def test_pixels_and_num_crops_match_hf(pan_and_scan):
    """A wide image (the last crop narrower than the others), a tall one, a square one (no crops), a grey and an RGBA
    one in one call: the same rows (image, then its crops) and num_crops as Gemma3ImageProcessorPil."""
    images = [_image(20, 50, 1), _image(47, 19, 2), _image(30, 30, 3), _image(18, 40, 4, c=1),
              Image.fromarray(_image(16, 33, 5, c=4), "RGBA")]
    hf = transformers.Gemma3ImageProcessorPil(size={"height": 16, "width": 16})
    ref, ref_crops = _hf_pixels(hf, images, do_pan_and_scan=pan_and_scan, **PAS)
    ours = Gemma3ImageProcessor(size=16, do_pan_and_scan=pan_and_scan, **PAS)
    rows = [ours(im) for im in images]
    assert [len(r) - 1 for r in rows] == ref_crops
    assert set(ref_crops) == ({0, 2, 3} if pan_and_scan else {0})  # the cases exercise no crops, 2 and 3
    np.testing.assert_allclose(np.concatenate(rows), ref, atol=1e-5)


def test_from_pretrained_reads_the_hf_config(tmp_path):
    hf = transformers.Gemma3ImageProcessorPil(size={"height": 12, "width": 12}, image_mean=[0.1, 0.2, 0.3],
                                              do_pan_and_scan=True, **PAS)
    hf.save_pretrained(tmp_path / "pas")
    ref, crops = _hf_pixels(hf, [_image(20, 50)])
    ours = Gemma3ImageProcessor.from_pretrained(str(tmp_path / "pas"))
    assert (ours.size, ours.do_pan_and_scan, ours.pan_and_scan_max_num_crops) == (12, True, 3)
    np.testing.assert_allclose(ours(_image(20, 50)), ref, atol=1e-5)
    # The hub's config leaves the pan-and-scan fields null: Gemma3Processor's defaults (off, 256, 4, 1.2).
    transformers.Gemma3ImageProcessorPil(size={"height": 12, "width": 12}).save_pretrained(tmp_path / "hub")
    assert Gemma3ImageProcessor.from_pretrained(str(tmp_path / "hub")) == Gemma3ImageProcessor(size=12)
    transformers.SiglipImageProcessorPil().save_pretrained(tmp_path / "siglip")
    with pytest.raises(ValueError, match="'SiglipImageProcessor"):
        Gemma3ImageProcessor.from_pretrained(str(tmp_path / "siglip"))
    transformers.Gemma3ImageProcessorPil(do_normalize=False).save_pretrained(tmp_path / "raw")
    with pytest.raises(ValueError, match="do_normalize"):
        Gemma3ImageProcessor.from_pretrained(str(tmp_path / "raw"))


def test_expanded_ids_match_gemma3_processor(tokenizers):
    """Raw text with three <start_of_image> markers (two images cropped, one adjacent to the next): our expansion,
    tokenised by our Tokenizer, gives Gemma3Processor's input_ids and token_type_ids; the runs are where the image
    rows go."""
    ours_tok, hf_tok = tokenizers
    images = [_image(20, 50, 1), _image(16, 16, 2), _image(47, 19, 3)]
    text = "<bos>what is <start_of_image> and<start_of_image><start_of_image>this"
    hf = transformers.Gemma3Processor(image_processor=transformers.Gemma3ImageProcessorPil(
        size={"height": 16, "width": 16}), tokenizer=hf_tok, image_seq_length=4)
    ref = hf(text=[text], images=[images], do_pan_and_scan=True, return_tensors="np", **PAS)
    proc = Gemma3ImageProcessor(size=16, do_pan_and_scan=True, **PAS)
    rows = [proc(im) for im in images]
    prompt = Gemma3Prompt(tokens_per_image=4)
    ids = ours_tok.encode(prompt.expand(text, [len(r) - 1 for r in rows]))
    np.testing.assert_array_equal(ids, ref["input_ids"][0])
    np.testing.assert_array_equal(np.asarray(ids) == IMAGE, ref["token_type_ids"][0] == 1)
    starts = prompt.runs(ids, IMAGE, sum(map(len, rows)))
    assert len(starts) == len(ref["pixel_values"]) and all(ids[s - 1] == BOI and ids[s + 4] == EOI for s in starts)
    np.testing.assert_allclose(np.concatenate(rows), ref["pixel_values"].transpose(0, 2, 3, 1), atol=1e-5)


def _model_config():
    """The tiny Gemma 3 of test_hf_gemma3 as config_map reads it (no weights needed here)."""
    from mllm_jax.hf import config_map

    return config_map.gemma3_from_hf({
        "model_type": "gemma3", "mm_tokens_per_image": 4, "image_token_index": IMAGE, "boi_token_index": BOI,
        "eoi_token_index": EOI,
        "text_config": {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
                        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "sliding_window": 6,
                        "layer_types": ["sliding_attention", "full_attention"]},
        "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 48,
                          "num_hidden_layers": 1, "num_attention_heads": 4, "image_size": 16, "patch_size": 4}})


def test_multimodal_processor_batch_frames_each_image_and_crop(tokenizers):
    """MultimodalProcessor on a Gemma 3 config: each image and crop one encoder row and one span of 4 tokens between
    <boi> and <eoi> (span 0), feature_index in row order, and the batch passes check_batch."""
    from mllm_jax import check_batch

    cfg = _model_config()
    proc = MultimodalProcessor(tokenizers[0], cfg, template="gemma", encoder_processors={
        "vision": Gemma3ImageProcessor.for_model(cfg.encoders["vision"], do_pan_and_scan=True, **PAS)})
    conv = [{"role": "user", "content": [{"type": "image", "image": _image(20, 40)},
                                         {"type": "text", "text": "what is this"}]},
            {"role": "assistant", "content": "a cat"}]
    batch = proc([conv, conv[:1] + [{"role": "assistant", "content": "a dog"}]], seq_len=64, pack=False)
    check_batch(batch, cfg)
    ids, span, fi = batch["input_ids"][0], batch["span_ids"][0], batch["feature_index"]["vision"][0]
    runs = np.flatnonzero(ids == IMAGE).reshape(3, 4)  # the image and its two crops
    assert all(ids[r[0] - 1] == BOI and ids[r[-1] + 1] == EOI for r in runs)
    np.testing.assert_array_equal(span[runs], np.repeat([[1], [2], [3]], 4, axis=1))
    assert span[ids == BOI].max() == span[ids == EOI].max() == 0
    np.testing.assert_array_equal(fi[runs], np.arange(12).reshape(3, 4))
    assert batch["encoder_inputs"]["vision"].shape == (6, 16, 16, 3)  # 2 rows x 3 instances


def test_bad_inputs_are_named(tokenizers):
    ours_tok = tokenizers[0]
    prompt = Gemma3Prompt(tokens_per_image=4)
    with pytest.raises(ValueError, match="2 <start_of_image> markers but 1 images"):
        prompt.expand("<start_of_image> <start_of_image>", [0])
    with pytest.raises(ValueError, match="already holds"):
        prompt.expand("<start_of_image><image_soft_token>", [0])
    ids = ours_tok.encode(prompt.expand("what <start_of_image>", [0]))
    with pytest.raises(ValueError, match=r"lengths \[4\]; expected 2 runs of 4"):
        prompt.runs(ids, IMAGE, 2)
    with pytest.raises(ValueError, match="pan_and_scan_max_num_crops >= 2; got 256 and 1"):
        Gemma3ImageProcessor(pan_and_scan_max_num_crops=1)
    with pytest.raises(ValueError, match="uint8"):
        Gemma3ImageProcessor(size=16)(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="image size must be positive; got 0x8"):
        Gemma3ImageProcessor(size=16)(np.zeros((0, 8, 3), np.uint8))
    cfg = _model_config()
    proc = MultimodalProcessor(ours_tok, cfg, template="gemma")
    with pytest.raises(ValueError, match="holds an image marker"):
        proc.encode([{"role": "user", "content": "what is <start_of_image>"}])
    bad = cfg.replace(placeholder_ids={"vision": 7})
    with pytest.raises(ValueError, match="maps '<image_soft_token>' to id 60, but the model's placeholder_ids is 7"):
        MultimodalProcessor(ours_tok, bad, template="gemma")
    with pytest.raises(ValueError, match=r"rows of shape \(8, 8, 3\); the 'vision' tower takes \(16, 16, 3\)"):
        MultimodalProcessor(ours_tok, cfg, encoder_processors={"vision": Gemma3ImageProcessor(size=8)})
