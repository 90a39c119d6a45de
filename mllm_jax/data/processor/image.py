"""Images -> normalised NHWC float32 pixels, the way the Hugging Face image processors do it (PIL path).

- CLIP (CLIPImageProcessor): resize so the shortest edge is ``size`` (bicubic, aspect kept), center crop to
  ``crop_size``, rescale by 1/255, normalise with the CLIP mean/std.
- SigLIP (SiglipImageProcessor): resize to a ``size`` x ``size`` square (bicubic), rescale, normalise with 0.5/0.5.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)
_RESAMPLE = {0: Image.NEAREST, 1: Image.LANCZOS, 2: Image.BILINEAR, 3: Image.BICUBIC, 4: Image.BOX, 5: Image.HAMMING}


@dataclasses.dataclass(frozen=True)
class ImageProcessor:
    """``kind="clip"``: shortest-edge resize + center crop; ``kind="siglip"``: square resize. Output [H, W, 3]."""

    kind: str = "clip"
    size: int = 224  # CLIP: the shortest edge; SigLIP: the square side
    crop_size: int | None = 224  # CLIP only; None = no crop
    mean: tuple = CLIP_MEAN
    std: tuple = CLIP_STD
    rescale_factor: float = 1 / 255
    resample: int = 3  # PIL bicubic

    def __post_init__(self):
        if self.kind not in ("clip", "siglip"):
            raise ValueError(f"ImageProcessor kind must be 'clip' or 'siglip'; got {self.kind!r}")

    @classmethod
    def for_model(cls, vision_config) -> "ImageProcessor":
        """The processor matching a VisionConfig (its image_size, CLIP or SigLIP statistics)."""
        if vision_config.kind == "siglip":
            return cls(kind="siglip", size=vision_config.image_size, crop_size=None, mean=SIGLIP_MEAN, std=SIGLIP_STD)
        return cls(kind="clip", size=vision_config.image_size, crop_size=vision_config.image_size)

    @classmethod
    def from_pretrained(cls, directory: str) -> "ImageProcessor":
        """Reads preprocessor_config.json written by a HF CLIP/SigLIP image processor."""
        path = os.path.join(directory, "preprocessor_config.json")
        hf = read_config_json(path, required=True)
        kind_name = hf.get("image_processor_type", "")
        kind = "siglip" if "Siglip" in kind_name else "clip" if "CLIP" in kind_name else None
        if kind is None:
            raise ValueError(f"{path}: unsupported image_processor_type {kind_name!r}; supported: CLIP*, Siglip*")
        size = hf.get("size", {})
        crop = hf.get("crop_size") if hf.get("do_center_crop", kind == "clip") else None
        return cls(
            kind=kind,
            size=int(size.get("shortest_edge", size.get("height", 224))) if isinstance(size, dict) else int(size),
            crop_size=(int(crop["height"]) if isinstance(crop, dict) else int(crop)) if crop else None,
            mean=tuple(hf.get("image_mean", CLIP_MEAN if kind == "clip" else SIGLIP_MEAN)),
            std=tuple(hf.get("image_std", CLIP_STD if kind == "clip" else SIGLIP_STD)),
            rescale_factor=float(hf.get("rescale_factor", 1 / 255)),
            resample=int(hf.get("resample", 3)),
        )

    @property
    def output_size(self) -> int:
        return self.crop_size if (self.kind == "clip" and self.crop_size) else self.size

    def __call__(self, image) -> np.ndarray:
        """A PIL image or uint8 array [H, W, 3] (or [H, W]) -> float32 [out, out, 3]."""
        img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
        img = img.convert("RGB")
        if self.kind == "clip":
            w, h = img.size
            short, long = (w, h) if w <= h else (h, w)
            new_short, new_long = self.size, int(self.size * long / short)
            new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
        else:
            new_w = new_h = self.size
        img = img.resize((new_w, new_h), resample=_RESAMPLE[self.resample])
        pixels = np.asarray(img, dtype=np.uint8)
        if self.kind == "clip" and self.crop_size:
            pixels = center_crop(pixels, self.crop_size)
        x = pixels.astype(np.float32) * np.float32(self.rescale_factor)
        return ((x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)).astype(np.float32)

    def batch(self, images) -> np.ndarray:
        """[N, out, out, 3]."""
        return np.stack([self(im) for im in images]) if len(images) else np.zeros((0, *self.shape), np.float32)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.output_size, self.output_size, 3)


def center_crop(pixels_HWC: np.ndarray, crop: int) -> np.ndarray:
    """Center crop to crop x crop; an image smaller than that is zero-padded around its centre first."""
    h, w = pixels_HWC.shape[:2]
    if h < crop or w < crop:
        ph, pw = max(crop - h, 0), max(crop - w, 0)
        pixels_HWC = np.pad(pixels_HWC, ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))
        h, w = pixels_HWC.shape[:2]
    top, left = (h - crop) // 2, (w - crop) // 2
    return pixels_HWC[top : top + crop, left : left + crop]


def read_config_json(path: str, *, required: bool) -> dict:
    """A HF processor's JSON config ({} when absent and not ``required``; a missing required one names the path)."""
    if not os.path.isfile(path):
        if required:
            raise ValueError(f"processor config not found: {path}")
        return {}
    with open(path) as f:
        return json.load(f)
