"""Images and videos at their own resolution -> Qwen2-VL patches, the way transformers' Qwen2-VL processors do it.

- ``smart_resize``: HF's rule: both sides a multiple of ``patch_size * merge_size``, the area within
  [min_pixels, max_pixels], the aspect ratio kept as closely as possible (aspect ratios above 200 refused).
- resize (PIL bicubic on uint8, as Qwen2VLImageProcessorPil), rescale by 1/255, normalise with the CLIP mean/std.
- ``patchify``: frames [T, h, w, C] -> patches [t*gh*gw, C*tp*p*p] in HF's ``pixel_values`` order: merge-group major
  (t, gh/m, gw/m, m, m), each patch flattened (channel, temporal, row, column). An image is one frame repeated to
  ``temporal_patch_size`` frames; a video whose frame count is not a multiple of it repeats its last frame.
- ``sample_frames``: the frame indices HF's Qwen2VLVideoProcessor.sample_frames takes at ``fps``.
- ``patch_grid``: each patch's (t, h, w) in its instance's grid (the batch key ``grid``, docs/native_resolution.md).

Videos are resized with PIL bicubic frame by frame (HF's video processor uses torchvision, which can differ from PIL
by rounding); grids and token counts are the same either way.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import NamedTuple

import numpy as np
from PIL import Image

from mllm_jax.data.processor.image import _RESAMPLE, CLIP_MEAN, CLIP_STD, read_config_json

MAX_ASPECT_RATIO = 200


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(height, width) both multiples of ``factor``, area within [min_pixels, max_pixels] (HF's smart_resize)."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive; got {height}x{width}")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(f"image {height}x{width}: absolute aspect ratio must be at most {MAX_ASPECT_RATIO}, got "
                         f"{max(height, width) / min(height, width)}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def sample_frames(total_frames: int, video_fps: float, fps: float, *, temporal_patch_size: int, min_frames: int,
                  max_frames: int) -> np.ndarray:
    """Indices of the frames sampled at ``fps`` from a video of ``total_frames`` frames at ``video_fps``: HF's
    sample_frames (the count clipped to [min_frames, max_frames] and the video's length, floored to a multiple of
    ``temporal_patch_size``, spread uniformly from frame 0)."""
    if total_frames <= 0:
        raise ValueError(f"video has no frames (total_frames={total_frames})")
    if video_fps <= 0 or fps <= 0:
        raise ValueError(f"video_fps and fps must be positive; got video_fps={video_fps}, fps={fps}")
    tp = temporal_patch_size
    max_frames = math.floor(min(max_frames, total_frames) / tp) * tp
    n = total_frames / video_fps * fps
    n = math.floor(min(max(n, min_frames), max_frames, total_frames) / tp) * tp
    if n <= 0:
        raise ValueError(f"video of {total_frames} frames has fewer than temporal_patch_size={tp} frames to sample")
    # torch.arange(0, total, total / n).int(): float32 steps, truncated
    return np.arange(0, total_frames, np.float32(total_frames / n), dtype=np.float32).astype(np.int64)


def patchify(frames_THWC: np.ndarray, patch_size: int, temporal_patch_size: int, merge_size: int) -> np.ndarray:
    """Normalised frames [T, h, w, C] -> patches [t*gh*gw, C*tp*p*p] in HF's order (module docstring)."""
    t_in, h, w, c = frames_THWC.shape
    p, tp, m = patch_size, temporal_patch_size, merge_size
    if h % (p * m) or w % (p * m):
        raise ValueError(f"frames {h}x{w} are not multiples of patch_size * merge_size = {p * m}")
    if pad := -t_in % tp:  # repeat the last frame up to a whole temporal patch (an image: tp copies of itself)
        frames_THWC = np.concatenate([frames_THWC, np.repeat(frames_THWC[-1:], pad, axis=0)])
    t, gh, gw = frames_THWC.shape[0] // tp, h // p, w // p
    x = frames_THWC.reshape(t, tp, gh // m, m, p, gw // m, m, p, c)
    # (t, gh/m, gw/m, mh, mw, C, tp, ph, pw)
    x = x.transpose(0, 2, 5, 3, 6, 8, 1, 4, 7)
    return np.ascontiguousarray(x.reshape(t * gh * gw, c * tp * p * p), dtype=np.float32)


def patch_grid(grid_thw, merge_size: int) -> np.ndarray:
    """[t*h*w, 3] int32: each patch's (t, h, w) coordinate, in the patch order of ``patchify``."""
    t, h, w = (int(v) for v in grid_thw)
    m = merge_size
    if h % m or w % m:
        raise ValueError(f"grid {t}x{h}x{w} is not a multiple of merge_size {m} in h and w")
    tt, hh, ww = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
    coords = np.stack([tt, hh, ww], -1).reshape(t, h // m, m, w // m, m, 3).transpose(0, 1, 3, 2, 4, 5)
    return np.ascontiguousarray(coords.reshape(t * h * w, 3), dtype=np.int32)


def token_count(grid_thw, merge_size: int) -> int:
    """LLM tokens of an instance after the patch merger: t*h*w / merge_size**2."""
    t, h, w = (int(v) for v in grid_thw)
    return t * h * w // merge_size**2


class NativeInstance(NamedTuple):
    """One image or video: patches [n, C*tp*p*p] float32, its grid (t, h, w) in patches and, for a video, the
    seconds one temporal grid step spans (HF Qwen2.5-VL ``second_per_grid_ts``: temporal_patch_size / the sampled
    frame rate; the M-RoPE time interval is tokens_per_second times it). None for an image."""

    patches: np.ndarray
    grid_thw: tuple[int, int, int]
    seconds_per_grid: float | None = None


@dataclasses.dataclass(frozen=True)
class NativeVisionProcessor:
    """Qwen2VLImageProcessor / Qwen2VLVideoProcessor on numpy (PIL for the resize)."""

    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    video_min_pixels: int = 128 * 28 * 28  # HF's video processor defaults
    video_max_pixels: int = 768 * 28 * 28
    fps: float = 2.0
    min_frames: int = 4
    max_frames: int = 768
    mean: tuple = CLIP_MEAN
    std: tuple = CLIP_STD
    rescale_factor: float = 1 / 255
    resample: int = 3  # PIL bicubic

    @classmethod
    def for_model(cls, cfg, **overrides) -> "NativeVisionProcessor":
        """The processor of a NativeVisionConfig (its patch sizes, pixel bounds and fps, for images and videos)."""
        kw = dict(patch_size=cfg.patch_size, temporal_patch_size=cfg.temporal_patch_size,
                  merge_size=cfg.spatial_merge_size, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels,
                  video_min_pixels=cfg.min_pixels, video_max_pixels=cfg.max_pixels, fps=cfg.fps)
        return cls(**(kw | overrides))

    @classmethod
    def from_pretrained(cls, directory: str) -> "NativeVisionProcessor":
        """Reads a HF Qwen2-VL processor directory: preprocessor_config.json (the image processor; ``size``
        shortest_edge/longest_edge or the older min_pixels/max_pixels) and, when present,
        video_preprocessor_config.json (the video processor's size, fps, min_frames, max_frames)."""
        image = read_config_json(os.path.join(directory, "preprocessor_config.json"), required=True)
        kind = image.get("image_processor_type", "")
        if not kind.startswith("Qwen2VLImageProcessor"):
            raise ValueError(f"{directory}/preprocessor_config.json: image_processor_type {kind!r} is not a Qwen2-VL "
                             f"image processor (Qwen2VLImageProcessor*)")
        kw = dict(patch_size=int(image.get("patch_size", 14)),
                  temporal_patch_size=int(image.get("temporal_patch_size", 2)),
                  merge_size=int(image.get("merge_size", 2)), mean=tuple(image.get("image_mean", CLIP_MEAN)),
                  std=tuple(image.get("image_std", CLIP_STD)),
                  rescale_factor=float(image.get("rescale_factor", 1 / 255)), resample=int(image.get("resample", 3)))
        kw["min_pixels"], kw["max_pixels"] = _pixel_bounds(image, cls.min_pixels, cls.max_pixels)
        video = read_config_json(os.path.join(directory, "video_preprocessor_config.json"), required=False)
        if video:
            kw["video_min_pixels"], kw["video_max_pixels"] = _pixel_bounds(video, cls.video_min_pixels,
                                                                           cls.video_max_pixels)
            kw.update({k: type(getattr(cls, k))(video[k]) for k in ("fps", "min_frames", "max_frames")
                       if video.get(k) is not None})
        for config, what in ((image, "preprocessor_config.json"), (video, "video_preprocessor_config.json")):
            off = [k for k in ("do_resize", "do_rescale", "do_normalize") if config.get(k) is False]
            if off:
                raise ValueError(f"{directory}/{what}: {off} = False is not supported (the processor always "
                                 f"resizes, rescales and normalises)")
        return cls(**kw)

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    def _resize(self, frames_THWC: np.ndarray, min_pixels: int, max_pixels: int) -> np.ndarray:
        """uint8 frames [T, H, W, C] -> normalised float32 [T, h, w, C] at smart_resize's size."""
        t, height, width, c = frames_THWC.shape
        h, w = smart_resize(height, width, self.factor, min_pixels, max_pixels)
        out = np.empty((t, h, w, c), np.float32)
        mean, std = np.asarray(self.mean, np.float32), np.asarray(self.std, np.float32)
        for i in range(t):
            img = Image.fromarray(frames_THWC[i] if c != 1 else frames_THWC[i, ..., 0])
            img = np.asarray(img.resize((w, h), resample=_RESAMPLE[self.resample]), np.float32).reshape(h, w, c)
            out[i] = (img * np.float32(self.rescale_factor) - mean) / std
        return out

    def _instance(self, frames: np.ndarray) -> NativeInstance:
        patches = patchify(frames, self.patch_size, self.temporal_patch_size, self.merge_size)
        grid = (-(-frames.shape[0] // self.temporal_patch_size), frames.shape[1] // self.patch_size,
                frames.shape[2] // self.patch_size)
        return NativeInstance(patches, grid)

    def image(self, image) -> NativeInstance:
        """A PIL image or uint8 array [H, W], [H, W, 1|3|4] -> patches, grid (RGB as HF: grey repeated, alpha
        composited onto white)."""
        return self._instance(self._resize(to_rgb(image)[None], self.min_pixels, self.max_pixels))

    def video(self, frames, *, video_fps: float | None = None) -> NativeInstance:
        """uint8 frames [T, H, W, C] -> patches, grid. With ``video_fps`` (the clip's frame rate) frames are first
        sampled at ``self.fps`` (sample_frames); without it every frame is kept."""
        frames = _uint8(frames, "video")
        if frames.ndim != 4:
            raise ValueError(f"video must be uint8 frames [T, H, W, C]; got shape {frames.shape}")
        if frames.shape[0] == 0:
            raise ValueError(f"video has no frames (shape {frames.shape})")
        # HF VideoMetadata.sampled_fps: the clip's rate scaled by the fraction kept; 24 when the rate is unknown
        sampled_fps = 24.0 if video_fps is None else float(video_fps)
        if video_fps is not None:
            total = frames.shape[0]
            frames = frames[sample_frames(total, video_fps, self.fps, temporal_patch_size=self.temporal_patch_size,
                                          min_frames=self.min_frames, max_frames=self.max_frames)]
            sampled_fps = len(frames) / total * video_fps
        inst = self._instance(self._resize(frames, self.video_min_pixels, self.video_max_pixels))
        return inst._replace(seconds_per_grid=self.temporal_patch_size / sampled_fps)

    def tokens(self, instance: NativeInstance) -> int:
        return token_count(instance.grid_thw, self.merge_size)


def to_rgb(image) -> np.ndarray:
    """uint8 [H, W, 3] the way HF's convert_to_rgb makes it: PIL images through PIL (transparency composited onto
    white), arrays [H, W] / [H, W, 1] repeated, [H, W, 4] blended onto white and rounded."""
    if isinstance(image, Image.Image):
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        return np.asarray(image.convert("RGB"), np.uint8)
    x = _uint8(image, "image")
    x = x[..., None] if x.ndim == 2 else x
    if x.ndim != 3 or x.shape[-1] not in (1, 3, 4):
        raise ValueError(f"image must be [H, W] or [H, W, 1|3|4] uint8; got shape {x.shape}")
    if x.shape[-1] == 1:
        return np.repeat(x, 3, axis=-1)
    if x.shape[-1] == 4:
        alpha = x[..., 3:4] / 255
        return np.round(alpha * x[..., :3] + (1 - alpha) * 255).astype(np.uint8)
    return x


def _pixel_bounds(config: dict, min_default: int, max_default: int) -> tuple[int, int]:
    """(min, max) pixels: top-level min_pixels/max_pixels override ``size`` (as HF's __init__ does)."""
    size = config.get("size") or {}
    lo = config.get("min_pixels") or size.get("shortest_edge") or size.get("min_pixels") or min_default
    hi = config.get("max_pixels") or size.get("longest_edge") or size.get("max_pixels") or max_default
    return int(lo), int(hi)


def _uint8(x, what: str) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype != np.uint8:
        raise ValueError(f"{what} must be uint8 pixels (0..255) or a PIL image; got dtype {x.dtype}")
    return x
