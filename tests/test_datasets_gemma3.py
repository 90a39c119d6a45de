"""The LLaVA-JSON reader for a Gemma 3 model (Gemma3LlavaSource) against MultimodalProcessor's batch and
transformers' Gemma3Processor for the same conversations: PNGs of several aspect ratios, with and without
pan-and-scan, through the Loader; header-only planning; a too-long sample skipped and counted."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from gemma3_testlib import IMAGE, make_tokenizers
from mllm_jax.data.datasets import DatasetConfig, Loader, make_source
from mllm_jax.data.datasets.sample import BadSampleError
from mllm_jax.data.datasets.sources import Gemma3LlavaSource
from mllm_jax.data.processor import MultimodalProcessor
from mllm_jax.data.processor.chat import TEMPLATES
from mllm_jax.data.processor.gemma3 import Gemma3ImageProcessor
from test_processor_gemma3 import PAS, _model_config

transformers = pytest.importorskip("transformers")

# (height, width, PIL mode) of each file: wide (last crop narrower), tall, square (never cropped), grey wide
IMAGES = {"wide.png": (20, 50, "RGB"), "tall.png": (47, 19, "RGB"), "square.png": (16, 16, "RGB"),
          "grey.png": (18, 40, "L")}
RECORDS = [
    {"id": "one", "image": "wide.png", "conversations": [
        {"from": "human", "value": "<image>\nwhat is this"}, {"from": "gpt", "value": "a cat"}]},
    {"id": "two", "image": ["tall.png", "square.png"], "conversations": [
        {"from": "human", "value": "what is <image> and<image>"}, {"from": "gpt", "value": "a cat and a dog"},
        {"from": "human", "value": "and this"}, {"from": "gpt", "value": "a dog"}]},
    {"id": "long", "image": "wide.png", "conversations": [
        {"from": "human", "value": "<image> what is this " + "see " * 60}, {"from": "gpt", "value": "a cat"}]},
    {"id": "text", "conversations": [{"from": "human", "value": "what is this"}, {"from": "gpt", "value": "a dog"}]},
    {"id": "grey", "image": ["grey.png"], "conversations": [
        {"from": "human", "value": "<image>"}, {"from": "gpt", "value": "a cat"}]},
]
GOOD = ["one", "two", "text", "grey"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """(folder, dataset json, our tokenizer, HF tokenizer, model config)."""
    root = tmp_path_factory.mktemp("gemma3_llava")
    rng = np.random.default_rng(0)
    for name, (h, w, mode) in IMAGES.items():
        shape = (h, w, 3) if mode == "RGB" else (h, w)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(root / name)
    (root / "data.json").write_text(json.dumps(RECORDS))
    ours, hf = make_tokenizers(root)
    return root, root / "data.json", ours, hf, _model_config()


def _processor_dir(root, pan_and_scan):
    """A HF processor directory (Gemma3ImageProcessorPil.save_pretrained) with pan-and-scan on; "" (the tower's
    processor, HF's defaults) without."""
    if not pan_and_scan:
        return ""
    transformers.Gemma3ImageProcessorPil(size={"height": 16, "width": 16}, do_pan_and_scan=True, **PAS
                                         ).save_pretrained(root / "pas")
    return str(root / "pas")


def _conversation(rec, root):
    """The record as MultimodalProcessor's messages: each <image> an image part (the decoded file)."""
    images = iter([rec["image"]] if isinstance(rec.get("image"), str) else rec.get("image", []))
    messages = []
    for turn in rec["conversations"]:
        parts = []
        for j, text in enumerate(turn["value"].split("<image>")):
            if j:
                parts.append({"type": "image", "image": Image.open(root / next(images))})
            if text:
                parts.append({"type": "text", "text": text})
        messages.append({"role": {"human": "user", "gpt": "assistant"}[turn["from"]], "content": parts})
    return messages


def _hf_inputs(rec, root, hf_tok, pan_and_scan):
    """Gemma3Processor on the whole conversation as one text (the gemma template's turns, <start_of_image> for
    each image): (input_ids, pixel_values NHWC)."""
    tpl = TEMPLATES["gemma"]
    role = {"human": "user", "gpt": "assistant"}
    text = tpl.bos + "".join(tpl.prefix[role[t["from"]]] + t["value"].replace("<image>", "<start_of_image>")
                             + tpl.suffix[role[t["from"]]] for t in rec["conversations"])
    files = [rec["image"]] if isinstance(rec.get("image"), str) else rec.get("image", [])
    hf = transformers.Gemma3Processor(image_processor=transformers.Gemma3ImageProcessorPil(
        size={"height": 16, "width": 16}), tokenizer=hf_tok, image_seq_length=4)
    kw = dict(images=[[Image.open(root / f) for f in files]], do_pan_and_scan=pan_and_scan, **PAS) if files else {}
    out = hf(text=[text], return_tensors="np", **kw)
    pixels = out["pixel_values"].transpose(0, 2, 3, 1) if files else np.zeros((0, 16, 16, 3), np.float32)
    return out["input_ids"][0], pixels


@pytest.mark.parametrize("pan_and_scan", [False, True])
def test_reader_batches_are_the_processors(data, pan_and_scan):
    """Each good record's Loader batch (one sample a batch) equals MultimodalProcessor's batch of the same
    conversation (ids, labels, positions, segments, spans, feature_index, encoder rows) and its ids and rows equal
    Gemma3Processor's on the whole text; the too-long record is skipped and counted; crops get their own cache keys."""
    root, path, tok, hf_tok, cfg = data
    oracle = MultimodalProcessor(tok, cfg, template="gemma", encoder_processors={
        "vision": Gemma3ImageProcessor(size=16, do_pan_and_scan=pan_and_scan, **PAS)})
    by_id = {r["id"]: r for r in RECORDS}
    lengths = {sid: len(oracle.encode(_conversation(by_id[sid], root)).ids) for sid in by_id}
    seq_len = max(lengths[s] for s in GOOD)
    assert lengths["long"] > seq_len  # the reader must find it too long
    dcfg = DatasetConfig(format="llava", path=str(path), global_batch_samples=1, rows_per_microbatch=1,
                         seq_len_buckets=(seq_len,), instance_buckets=(2, 4, 8), shuffle=False, prefetch=1,
                         num_workers=1, processor_path=_processor_dir(root, pan_and_scan))
    src = make_source(dcfg, tok, cfg)
    assert isinstance(src, Gemma3LlavaSource) and src.processor.do_pan_and_scan == pan_and_scan
    n_views = []
    with Loader(src, dcfg, cfg, num_data_ranks=1, microbatches=1, process_index=0, process_count=1) as loader:
        for sid in GOOD:
            batch = next(loader)
            assert loader.last_sample_ids == [[[sid]]]
            conv = _conversation(by_id[sid], root)
            k = batch["encoder_inputs"]["vision"].shape[1]
            want = oracle([conv], seq_len=seq_len, instances={"vision": k})
            for key in ("input_ids", "labels", "positions", "segment_ids", "span_ids"):
                np.testing.assert_array_equal(batch[key][0], want[key], err_msg=f"{sid} {key}")
            np.testing.assert_array_equal(batch["feature_index"]["vision"][0], want["feature_index"]["vision"])
            np.testing.assert_array_equal(batch["encoder_inputs"]["vision"][0], want["encoder_inputs"]["vision"])
            ids, pixels = _hf_inputs(by_id[sid], root, hf_tok, pan_and_scan)
            n = len(pixels)
            np.testing.assert_array_equal(batch["input_ids"][0, 0, :len(ids)], ids, err_msg=sid)
            assert not batch["input_ids"][0, 0, len(ids):].any()
            np.testing.assert_allclose(batch["encoder_inputs"]["vision"][0, :n], pixels, atol=1e-5)
            assert (batch["input_ids"][0] == IMAGE).sum() == 4 * n
            keys = loader.last_instance_keys["vision"][0, :n]
            assert len(set(keys)) == n and all(key for key in keys)
            n_views.append(n)
        assert loader.bad_sample_counts == {"too_long": 1}
    # the cases: without pan-and-scan one row per image; with it the wide, tall and grey images are cropped
    assert n_views == ([1, 2, 0, 1] if not pan_and_scan else [1 + 3, 1 + 2 + 1, 0, 1 + 2])


def test_planning_reads_headers_only(data, tmp_path):
    """prepare plans an image's crops from its header: a PNG cut after its header plans them and fails only when
    decoded (corrupt_file); a file replaced after planning by one of another shape is grid_mismatch. An image in
    an answer and Gemma 3 markers in the text are malformed records; a processor of another size is refused. The
    cache fingerprint follows the pan-and-scan settings."""
    root, _, tok, _, cfg = data
    png = io.BytesIO()
    Image.fromarray(np.zeros((20, 50, 3), np.uint8)).save(png, format="PNG")
    (tmp_path / "cut.png").write_bytes(png.getvalue()[:60])  # signature + IHDR: the size, no pixel
    Image.fromarray(np.zeros((20, 50, 3), np.uint8)).save(tmp_path / "swap.png")
    records = [{"id": name, "image": f"{name}.png", "conversations": [
        {"from": "human", "value": "<image>"}, {"from": "gpt", "value": "a cat"}]} for name in ("cut", "swap")]
    records += [{"id": "answer", "image": "swap.png", "conversations": [
                    {"from": "human", "value": "what"}, {"from": "gpt", "value": "<image>"}]},
                {"id": "marker", "conversations": [
                    {"from": "human", "value": "what <start_of_image>"}, {"from": "gpt", "value": "a cat"}]}]
    (tmp_path / "d.json").write_text(json.dumps(records))
    dcfg = DatasetConfig(format="llava", path=str(tmp_path / "d.json"), seq_len_buckets=(128,),
                         instance_buckets=(8,), processor_path=_processor_dir(root, True))
    src = make_source(dcfg, tok, cfg)
    cut = src.prepare(0)
    assert [i.view for i in cut.instances] == [0, 1, 2, 3]
    with pytest.raises(BadSampleError, match="corrupt_file"):
        src.materialize(cut)
    swap = src.prepare(1)
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "swap.png")
    with pytest.raises(BadSampleError, match=r"grid_mismatch.*decoded to 0 crops, but its header planned 3"):
        src.materialize(swap)
    with pytest.raises(BadSampleError, match="malformed_record.*media in an assistant message"):
        src.prepare(2)
    with pytest.raises(BadSampleError, match="malformed_record.*holds an image marker"):
        src.prepare(3)
    transformers.Gemma3ImageProcessorPil(size={"height": 8, "width": 8}).save_pretrained(tmp_path / "p8")
    with pytest.raises(ValueError, match="images of 8 px, but the 'vision' tower takes image_size=16"):
        make_source(DatasetConfig(format="llava", path=str(tmp_path / "d.json"), processor_path=str(tmp_path / "p8")),
                    tok, cfg)
    plain = make_source(DatasetConfig(format="llava", path=str(tmp_path / "d.json")), tok, cfg)
    assert plain.preprocessing() != src.preprocessing()


def test_a_pretrained_gemma3_directory_gives_the_processor(data, tmp_path):
    """A run from a Gemma 3 checkpoint reads the checkpoint directory's preprocessor_config.json (pan-and-scan and
    its limits), as for native towers; DatasetConfig.processor_path wins; other towers keep their own processor."""
    import dataclasses

    from mllm_jax.config import ProjectorConfig
    from mllm_jax.data.train_data import vision_processor_path
    from mllm_jax.hf.recipe import PretrainedConfig

    cfg = data[4]
    checkpoint = _processor_dir(tmp_path, True)
    assert vision_processor_path(DatasetConfig(), cfg, PretrainedConfig(model=checkpoint)) == checkpoint
    assert vision_processor_path(DatasetConfig(), cfg, PretrainedConfig(encoders={"vision": checkpoint})) == checkpoint
    assert vision_processor_path(DatasetConfig(processor_path="mine"), cfg, PretrainedConfig(model=checkpoint)) == "mine"
    assert vision_processor_path(DatasetConfig(), cfg, PretrainedConfig(model=str(tmp_path / "none"))) == ""
    assert vision_processor_path(DatasetConfig(), cfg, None) == ""
    llava = dataclasses.replace(cfg, projectors={"vision": ProjectorConfig(kind="mlp")})
    assert vision_processor_path(DatasetConfig(), llava, PretrainedConfig(model=checkpoint)) == ""
    assert Gemma3ImageProcessor.from_pretrained(checkpoint).do_pan_and_scan
