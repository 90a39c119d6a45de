"""The native-resolution processor (mllm_jax.data.processor.native_vision) against transformers' Qwen2-VL processors.

Images: Qwen2VLImageProcessorPil (resize, normalise, patch order, grids). Videos: HF's video processor needs
torchvision, which the test environment lacks, so its ``sample_frames`` and ``patchify`` methods are taken from
transformers' source file and run on torch as they are (the frame indices and the patch order are HF's code's own
answers); the video resize (torchvision in HF, PIL here) is not compared.
"""

import ast
import math
import pathlib
import types

import numpy as np
import pytest
from PIL import Image

from mllm_jax.config import NativeVisionConfig
from mllm_jax.data.processor.native_vision import (NativeVisionProcessor, patch_grid, patchify, sample_frames,
                                                   smart_resize, token_count)

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")
from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as hf_pil  # noqa: E402

P, TP, M = 4, 2, 2
MIN_PIX, MAX_PIX = 8 * 8 * 4, 8 * 8 * 48


def _image(h, w, seed=0, c=3):
    return np.random.default_rng(seed).integers(0, 256, (h, w, c), dtype=np.uint8)


@pytest.fixture(scope="module")
def hf_image_processor():
    return hf_pil.Qwen2VLImageProcessorPil(min_pixels=MIN_PIX, max_pixels=MAX_PIX, patch_size=P,
                                           temporal_patch_size=TP, merge_size=M)


@pytest.fixture(scope="module")
def ours():
    return NativeVisionProcessor(patch_size=P, temporal_patch_size=TP, merge_size=M, min_pixels=MIN_PIX,
                                 max_pixels=MAX_PIX, video_min_pixels=MIN_PIX, video_max_pixels=MAX_PIX)


@pytest.fixture(scope="module")
def hf_video_methods():
    """Qwen2VLVideoProcessor.sample_frames / patchify, compiled from transformers' source (module docstring)."""
    src = pathlib.Path(transformers.__file__).parent / "models/qwen2_vl/video_processing_qwen2_vl.py"
    cls = next(n for n in ast.parse(src.read_text()).body
               if isinstance(n, ast.ClassDef) and n.name == "Qwen2VLVideoProcessor")
    ns = {"math": math, "torch": torch}
    for fn in cls.body:
        if isinstance(fn, ast.FunctionDef) and fn.name in ("sample_frames", "patchify"):
            fn.decorator_list = []
            fn.args.args = [ast.arg(a.arg) for a in fn.args.args]  # drop annotations naming HF-only types
            for a in fn.args.kwonlyargs:
                a.annotation = None
            fn.returns = None
            exec(compile(ast.fix_missing_locations(ast.Module([fn], [])), str(src), "exec"), ns)
    return ns["sample_frames"], ns["patchify"]


@pytest.mark.parametrize("h,w", [(37, 53), (64, 30), (8, 300), (2, 5), (120, 90), (16, 16)])
def test_image_patches_and_grid_match_hf(hf_image_processor, ours, h, w):
    ref = hf_image_processor(images=[_image(h, w)], return_tensors="np")
    inst = ours.image(_image(h, w))
    assert inst.grid_thw == tuple(ref["image_grid_thw"][0])
    assert inst.patches.shape == ref["pixel_values"].shape
    np.testing.assert_allclose(inst.patches, ref["pixel_values"], atol=1e-5)
    assert ours.tokens(inst) == hf_image_processor.get_number_of_image_patches(h, w) // M**2
    assert ours.tokens(inst) == inst.patches.shape[0] // M**2


def test_grey_and_transparent_images_are_converted_to_rgb_like_hf(hf_image_processor, ours):
    grey = _image(30, 41, c=1)[..., 0]
    rgba = _image(30, 41, c=4)
    rgba[..., 3] = np.where(np.arange(41) < 20, 255, rgba[..., 3])  # opaque half, random alpha half
    cases = [(Image.fromarray(grey),) * 2, (grey, grey[..., None]), (Image.fromarray(rgba),) * 2, (rgba, rgba)]
    for image, hf_image in cases:  # ([H, W]: HF takes no 2-D array, it gets [H, W, 1])
        ref = hf_image_processor(images=[hf_image], return_tensors="np")["pixel_values"]
        np.testing.assert_allclose(ours.image(image).patches, ref, atol=1e-5, err_msg=str(np.shape(image)))


@pytest.mark.parametrize("h,w", [(1, 1), (17, 3000), (999, 1001), (224, 224), (4000, 30)])
def test_smart_resize_matches_hf_at_full_scale(h, w):
    for lo, hi in ((56 * 56, 28 * 28 * 1280), (128 * 28 * 28, 768 * 28 * 28)):
        assert smart_resize(h, w, 28, lo, hi) == hf_pil.smart_resize(h, w, 28, lo, hi)


def test_extreme_aspect_ratio_refused_like_hf(ours):
    with pytest.raises(ValueError, match="aspect ratio") as theirs:
        hf_pil.smart_resize(2, 500, 28, 56 * 56, 28 * 28 * 1280)
    with pytest.raises(ValueError, match="aspect ratio must be at most 200, got 250") as mine:
        ours.image(_image(2, 500))
    assert "250" in str(theirs.value)
    assert "2x500" in str(mine.value)


def test_bad_inputs_named(ours):
    with pytest.raises(ValueError, match="no frames"):
        ours.video(np.zeros((0, 16, 16, 3), np.uint8))
    with pytest.raises(ValueError, match="no frames"):
        sample_frames(0, 30.0, 2.0, temporal_patch_size=2, min_frames=4, max_frames=768)
    with pytest.raises(ValueError, match="fewer than temporal_patch_size=2"):
        ours.video(np.zeros((1, 16, 16, 3), np.uint8), video_fps=30.0)
    with pytest.raises(ValueError, match="uint8.*float32"):
        ours.image(np.zeros((16, 16, 3), np.float32))


@pytest.mark.parametrize("total,video_fps,fps,min_f,max_f", [
    (300, 30.0, 2.0, 4, 768), (10, 30.0, 2.0, 4, 768), (7, 24.0, 2.0, 4, 768), (1000, 25.0, 2.0, 4, 16),
    (97, 29.97, 1.5, 4, 768), (3, 10.0, 2.0, 4, 768), (2, 1.0, 2.0, 4, 768), (61, 3.0, 5.0, 2, 40)])
def test_sample_frames_match_hf(hf_video_methods, total, video_fps, fps, min_f, max_f):
    hf_sample, _ = hf_video_methods
    self = types.SimpleNamespace(num_frames=None, fps=fps, temporal_patch_size=TP, min_frames=min_f,
                                 max_frames=max_f)
    ref = hf_sample(self, types.SimpleNamespace(total_num_frames=total, fps=video_fps)).numpy()
    got = sample_frames(total, video_fps, fps, temporal_patch_size=TP, min_frames=min_f, max_frames=max_f)
    np.testing.assert_array_equal(got, ref)
    assert len(got) % TP == 0


@pytest.mark.parametrize("t,h,w", [(4, 8, 16), (3, 16, 8), (1, 8, 8)])
def test_video_patch_order_and_grid_match_hf(hf_video_methods, t, h, w):
    _, hf_patchify = hf_video_methods
    frames = np.random.default_rng(t).standard_normal((t, h, w, 3)).astype(np.float32)
    ref, gt, gh, gw = hf_patchify(None, torch.from_numpy(frames.transpose(0, 3, 1, 2))[None], P, M, TP)
    np.testing.assert_array_equal(patchify(frames, P, TP, M), ref[0].numpy())
    grid = patch_grid((gt, gh, gw), M)
    assert grid.shape == (gt * gh * gw, 3) and token_count((gt, gh, gw), M) == gt * gh * gw // M**2
    # The grid names the patch: rebuild each patch from the frames at its (t, h, w) and compare.
    padded = np.concatenate([frames, np.repeat(frames[-1:], -t % TP, axis=0)])
    for n in range(0, len(grid), 5):
        tt, hh, ww = grid[n]
        block = padded[tt * TP:(tt + 1) * TP, hh * P:(hh + 1) * P, ww * P:(ww + 1) * P]  # [tp, p, p, C]
        np.testing.assert_array_equal(ref[0, n].numpy(), block.transpose(3, 0, 1, 2).reshape(-1))


def test_video_sampled_and_patched(ours):
    frames = np.random.default_rng(0).integers(0, 256, (45, 20, 30, 3), dtype=np.uint8)
    inst = ours.video(frames, video_fps=15.0)  # 45 frames at 15 fps = 3 s -> 6 frames at 2 fps -> t = 3
    h, w = smart_resize(20, 30, P * M, MIN_PIX, MAX_PIX)
    assert inst.grid_thw == (3, h // P, w // P)
    assert inst.patches.shape == (3 * (h // P) * (w // P), 3 * TP * P * P)
    from transformers.video_utils import VideoMetadata
    idx = sample_frames(45, 15.0, ours.fps, temporal_patch_size=TP, min_frames=ours.min_frames,
                        max_frames=ours.max_frames)
    assert inst.seconds_per_grid == TP / VideoMetadata(total_num_frames=45, fps=15.0, frames_indices=idx).sampled_fps
    assert ours.video(frames[:6]).seconds_per_grid == TP / VideoMetadata(total_num_frames=6, fps=None).sampled_fps
    assert ours.image(frames[0]).seconds_per_grid is None
    # The temporal patches are the sampled frames 0, 7, 15, ...: the first patch's first frame is frame 0 resized.
    first = ours.image(frames[0]).patches
    np.testing.assert_allclose(inst.patches[: len(first)].reshape(len(first), 3, TP, -1)[:, :, 0],
                               first.reshape(len(first), 3, TP, -1)[:, :, 0], atol=1e-6)


def test_from_pretrained_reads_the_hf_processor(tmp_path):
    hf = hf_pil.Qwen2VLImageProcessorPil(min_pixels=300, max_pixels=2000, patch_size=P, temporal_patch_size=TP,
                                         merge_size=M, image_mean=[0.1, 0.2, 0.3])
    hf.save_pretrained(tmp_path)
    (tmp_path / "video_preprocessor_config.json").write_text(
        '{"size": {"shortest_edge": 400, "longest_edge": 900}, "fps": 1.5, "min_frames": 2, "max_frames": 10}')
    proc = NativeVisionProcessor.from_pretrained(str(tmp_path))
    for h, w in ((37, 53), (90, 17)):
        ref = hf(images=[_image(h, w)], return_tensors="np")
        inst = proc.image(_image(h, w))
        assert inst.grid_thw == tuple(ref["image_grid_thw"][0])
        np.testing.assert_allclose(inst.patches, ref["pixel_values"], atol=1e-5)
    assert (proc.video_min_pixels, proc.video_max_pixels, proc.fps, proc.min_frames, proc.max_frames) == (
        400, 900, 1.5, 2, 10)
    (tmp_path / "preprocessor_config.json").write_text('{"image_processor_type": "CLIPImageProcessor"}')
    with pytest.raises(ValueError, match="CLIPImageProcessor"):
        NativeVisionProcessor.from_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="not found"):
        NativeVisionProcessor.from_pretrained(str(tmp_path / "nowhere"))


def test_for_model_takes_the_config():
    cfg = NativeVisionConfig(patch_size=P, temporal_patch_size=TP, spatial_merge_size=M, min_pixels=MIN_PIX,
                             max_pixels=MAX_PIX, fps=1.0)
    proc = NativeVisionProcessor.for_model(cfg)
    assert (proc.factor, proc.min_pixels, proc.video_max_pixels, proc.fps) == (P * M, MIN_PIX, MAX_PIX, 1.0)
