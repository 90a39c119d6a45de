"""Gemma 3's processor (Gemma3ImageProcessor, PIL path, and Gemma3Processor's prompt expansion) on numpy.

- Pixels: each image to RGB, resized to the tower's square with PIL bilinear, rescaled and normalised (the shared
  ``ImageProcessor``'s SigLIP path). With pan-and-scan an image of aspect ratio >= ``pan_and_scan_min_ratio_to_activate``
  is also cut along its long side into 2..``pan_and_scan_max_num_crops`` crops of at least
  ``pan_and_scan_min_crop_size`` px (``pan_and_scan_grid``: HF's exact grid; the last crop may be narrower), each
  resized like an image. An image gives rows [the image, its crops...], each one encoder instance.
- Text: each image's ``<start_of_image>`` becomes "\\n\\n<start_of_image>" + ``<image_soft_token>`` x tokens_per_image +
  "<end_of_image>\\n\\n" (HF ``full_image_sequence``); an image with crops becomes "Here is the original image " + that
  + " and here are some crops to help you see better " + one such sequence per crop, joined by spaces
  (``Gemma3Prompt.replacement``). The expanded text is tokenised as one string, as HF does, so the newlines merge with
  the text around them exactly as the tokenizer merges them.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

import numpy as np

from mllm_jax.data.processor.image import SIGLIP_MEAN, SIGLIP_STD, ImageProcessor, read_config_json
from mllm_jax.data.processor.native_vision import to_rgb

BOI, EOI, IMAGE_TOKEN = "<start_of_image>", "<end_of_image>", "<image_soft_token>"  # the released tokenizer's
BILINEAR = 2  # PIL; Gemma3ImageProcessor's resample (SigLIP's is bicubic)
# Gemma3Processor.images_kwargs: what the hub's preprocessor_config.json (whose values are null) falls back to.
PAN_AND_SCAN_DEFAULTS = {"do_pan_and_scan": False, "pan_and_scan_min_crop_size": 256, "pan_and_scan_max_num_crops": 4,
                         "pan_and_scan_min_ratio_to_activate": 1.2}


def pan_and_scan_grid(height: int, width: int, *, min_crop_size: int, max_num_crops: int,
                      min_ratio_to_activate: float) -> list[tuple[int, int, int, int]]:
    """The crops (top, left, crop_height, crop_width) HF's Gemma3ImageProcessor.pan_and_scan cuts from an image of
    height x width, row-major; [] when the image is not elongated enough or the crops would be too small. A crop
    may run past the image's edge: slicing clips it, as HF's does."""
    if width >= height:  # landscape or square: crops side by side
        if width / height < min_ratio_to_activate:
            return []
        n_w = min(int(math.floor(width / height + 0.5)), int(math.floor(width / min_crop_size)))  # half rounds up
        n_w, n_h = min(max_num_crops, max(2, n_w)), 1
    else:  # portrait: crops stacked
        if height / width < min_ratio_to_activate:
            return []
        n_h = min(int(math.floor(height / width + 0.5)), int(math.floor(height / min_crop_size)))
        n_h, n_w = min(max_num_crops, max(2, n_h)), 1
    crop_w, crop_h = int(math.ceil(width / n_w)), int(math.ceil(height / n_h))
    if min(crop_w, crop_h) < min_crop_size:
        return []
    return [(crop_h * i, crop_w * j, crop_h, crop_w) for i in range(n_h) for j in range(n_w)]


@dataclasses.dataclass(frozen=True)
class Gemma3ImageProcessor:
    """Gemma3ImageProcessor (PIL backend): ``__call__(image)`` -> float32 [1 + crops, size, size, 3]."""

    size: int = 896
    mean: tuple = SIGLIP_MEAN
    std: tuple = SIGLIP_STD
    rescale_factor: float = 1 / 255
    resample: int = BILINEAR
    do_pan_and_scan: bool = False
    pan_and_scan_min_crop_size: int = 256
    pan_and_scan_max_num_crops: int = 4
    pan_and_scan_min_ratio_to_activate: float = 1.2

    def __post_init__(self):
        if self.pan_and_scan_min_crop_size < 1 or self.pan_and_scan_max_num_crops < 2:
            raise ValueError(f"pan_and_scan_min_crop_size must be >= 1 and pan_and_scan_max_num_crops >= 2; got "
                             f"{self.pan_and_scan_min_crop_size} and {self.pan_and_scan_max_num_crops}")

    @classmethod
    def for_model(cls, vision_config, **overrides) -> "Gemma3ImageProcessor":
        """The processor of a Gemma 3 SigLIP tower (its image_size); ``overrides`` e.g. do_pan_and_scan=True."""
        return cls(**({"size": vision_config.image_size} | overrides))

    @classmethod
    def from_pretrained(cls, directory: str) -> "Gemma3ImageProcessor":
        """Reads a HF Gemma 3 processor directory's preprocessor_config.json (null pan-and-scan fields take
        Gemma3Processor's defaults, as HF's processor does)."""
        path = os.path.join(directory, "preprocessor_config.json")
        hf = read_config_json(path, required=True)
        kind = hf.get("image_processor_type", "")
        if not kind.startswith("Gemma3ImageProcessor"):
            raise ValueError(f"{path}: image_processor_type {kind!r} is not a Gemma 3 image processor "
                             f"(Gemma3ImageProcessor*)")
        off = [k for k in ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb") if hf.get(k) is False]
        if off:
            raise ValueError(f"{path}: {off} = False is not supported (the processor always converts to RGB, resizes, "
                             f"rescales and normalises)")
        size = hf.get("size") or {"height": cls.size, "width": cls.size}
        if not isinstance(size, dict) or size.get("height") is None or size.get("height") != size.get("width"):
            raise ValueError(f"{path}: size must be a square {{'height': n, 'width': n}}; got {size!r}")
        kw = {k: type(v)(hf[k]) if hf.get(k) is not None else v for k, v in PAN_AND_SCAN_DEFAULTS.items()}
        return cls(size=int(size["height"]), mean=tuple(hf.get("image_mean") or SIGLIP_MEAN),
                   std=tuple(hf.get("image_std") or SIGLIP_STD),
                   rescale_factor=float(hf.get("rescale_factor") or 1 / 255),
                   resample=int(hf["resample"]) if hf.get("resample") is not None else BILINEAR, **kw)

    @property
    def square(self) -> ImageProcessor:
        """The resize / rescale / normalise of one image or crop (the shared SigLIP path)."""
        return ImageProcessor(kind="siglip", size=self.size, crop_size=None, mean=self.mean, std=self.std,
                              rescale_factor=self.rescale_factor, resample=self.resample)

    @property
    def shape(self) -> tuple[int, int, int]:
        """One encoder row (the image or one of its crops)."""
        return (self.size, self.size, 3)

    def crops(self, height: int, width: int) -> list[tuple[int, int, int, int]]:
        """The pan-and-scan crops of an image of this size ([] without pan-and-scan)."""
        if height <= 0 or width <= 0:
            raise ValueError(f"image size must be positive; got {height}x{width}")
        if not self.do_pan_and_scan:
            return []
        return pan_and_scan_grid(height, width, min_crop_size=self.pan_and_scan_min_crop_size,
                                 max_num_crops=self.pan_and_scan_max_num_crops,
                                 min_ratio_to_activate=self.pan_and_scan_min_ratio_to_activate)

    def __call__(self, image) -> np.ndarray:
        """A PIL image or uint8 array [H, W], [H, W, 1|3|4] -> float32 [1 + n_crops, size, size, 3]: the image, then
        its crops (HF's pixel_values order; ``len(out) - 1`` is HF's num_crops)."""
        rgb_HWC = to_rgb(image)
        square = self.square
        boxes = self.crops(*rgb_HWC.shape[:2])
        views = [rgb_HWC] + [np.ascontiguousarray(rgb_HWC[t:t + h, l:l + w]) for t, l, h, w in boxes]
        return np.stack([square(v) for v in views])


@dataclasses.dataclass(frozen=True)
class Gemma3Prompt:
    """Gemma3Processor's text side: what each image's ``boi`` marker becomes."""

    tokens_per_image: int  # HF image_seq_length (= the model's mm_tokens_per_image)
    boi: str = BOI
    eoi: str = EOI
    image_token: str = IMAGE_TOKEN

    @classmethod
    def for_model(cls, model_config, tokenizer, name: str = "vision", **tokens) -> "Gemma3Prompt":
        """The prompt of a Gemma 3 ModelConfig; the tokenizer must map the marker strings to the config's
        placeholder, boi and eoi ids (ValueError naming the token and both ids)."""
        proj = model_config.projectors[name]
        if proj.kind != "gemma3":
            raise ValueError(f"projector {name!r} has kind={proj.kind!r}; the Gemma 3 prompt needs kind='gemma3'")
        prompt = cls(tokens_per_image=model_config.features_per_instance(name), **tokens)
        for text, want, field in ((prompt.image_token, model_config.placeholder_ids[name], "placeholder_ids"),
                                  (prompt.boi, proj.boi_token_id, "boi_token_id"),
                                  (prompt.eoi, proj.eoi_token_id, "eoi_token_id")):
            got = tokenizer.token_to_id(text)
            if want is not None and got != want:
                raise ValueError(f"the tokenizer maps {text!r} to id {got}, but the model's {field} is {want}")
        return prompt

    @property
    def image_sequence(self) -> str:
        """HF full_image_sequence: one image (or crop) between blank lines."""
        return f"\n\n{self.boi}{self.image_token * self.tokens_per_image}{self.eoi}\n\n"

    def replacement(self, num_crops: int) -> str:
        """The text one image's marker becomes (HF Gemma3Processor.replace_image_token)."""
        if not num_crops:
            return self.image_sequence
        return (f"Here is the original image {self.image_sequence} and here are some crops to help you see better "
                + " ".join([self.image_sequence] * num_crops))

    def expand(self, text: str, num_crops) -> str:
        """Each ``boi`` marker of ``text``, in order, replaced for the image with ``num_crops[i]`` crops."""
        parts = text.split(self.boi)
        if len(parts) - 1 != len(num_crops):
            raise ValueError(f"the text has {len(parts) - 1} {self.boi} markers but {len(num_crops)} images were given")
        if self.image_token in text or self.eoi in text:
            raise ValueError(f"the text already holds {self.image_token!r} or {self.eoi!r}: images are marked by "
                             f"{self.boi!r} alone")
        return parts[0] + "".join(self.replacement(int(n)) + p for n, p in zip(num_crops, parts[1:]))

    def runs(self, ids, image_token_id: int, instances: int) -> list[int]:
        """The start of each image-token run in ``ids``; each must be ``tokens_per_image`` long and there must be
        ``instances`` of them (else a tokenizer that splits a marker, or text holding one, would misalign)."""
        is_image = np.asarray(ids) == image_token_id
        edges = np.flatnonzero(np.diff(np.concatenate([[0], is_image.astype(np.int8), [0]])))
        starts, lengths = edges[::2], edges[1::2] - edges[::2]
        if len(starts) != instances or np.any(lengths != self.tokens_per_image):
            raise ValueError(f"the tokenised prompt has image-token runs of lengths {lengths.tolist()}; expected "
                             f"{instances} runs of {self.tokens_per_image} (one per image and crop)")
        return [int(s) for s in starts]


def expand_text_pieces(pieces, prompt: Gemma3Prompt, processor: Gemma3ImageProcessor, modality: str):
    """Chat-template pieces (chat.Piece) -> (``frame_pieces`` of them, each ``modality`` image's crops counted from
    its pixels; the image rows [1 + crops, S, S, 3] in order)."""
    rows = []

    def num_crops(image) -> int:
        rows.append(processor(image))
        return len(rows[-1]) - 1

    return frame_pieces(pieces, prompt, num_crops, modality), rows


def frame_pieces(pieces, prompt: Gemma3Prompt, num_crops, modality: str) -> list:
    """Chat-template pieces (chat.Piece) -> pieces with each ``modality`` image replaced by its text
    (``prompt.replacement(num_crops(image))``), merged with the text around it. Adjacent text pieces of one training
    flag are merged so that they tokenise as HF tokenises the whole prompt. ``num_crops``: from the pixels
    (expand_text_pieces) or from the image's header alone (a dataset reader planning lengths before decoding)."""
    out = []
    for p in pieces:
        if p.modality == modality:
            p = p._replace(text=prompt.replacement(int(num_crops(p.data))), modality=None, data=None)
        elif p.modality is None and re.search("|".join(map(re.escape, (prompt.boi, prompt.eoi, prompt.image_token))),
                                              p.text):
            raise ValueError(f"message text {p.text!r} holds an image marker ({prompt.boi}, {prompt.eoi} or "
                             f"{prompt.image_token}); pass images as {{'type': 'image'}} parts")
        if out and p.modality is None and out[-1].modality is None and out[-1].train == p.train:
            out[-1] = out[-1]._replace(text=out[-1].text + p.text)
        else:
            out.append(p)
    return out
