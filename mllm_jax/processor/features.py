"""How many LLM tokens one encoder instance becomes: the length of its placeholder run."""

from __future__ import annotations


def vit_patches(image_size: int, patch_size: int) -> int:
    """ViT/SigLIP: one token per non-overlapping patch."""
    if image_size % patch_size:
        raise ValueError(f"image_size={image_size} is not a multiple of patch_size={patch_size}")
    return (image_size // patch_size) ** 2


def clip_tokens(image_size: int, patch_size: int, *, keep_class_token: bool) -> int:
    """CLIP: the patches plus the class token, unless it is dropped (LLaVA's 'default' feature strategy)."""
    return vit_patches(image_size, patch_size) + (1 if keep_class_token else 0)


def whisper_frames(n_frames: int) -> int:
    """Whisper: conv1 (stride 1) then conv2 (kernel 3, stride 2, padding 1) halves the mel frames, rounding up."""
    return (n_frames - 1) // 2 + 1


def feature_count(model_config, name: str) -> int:
    """Placeholder tokens per instance of modality ``name`` under a ModelConfig (a resampler fixes its own count)."""
    if name not in model_config.encoders:
        raise ValueError(f"modality {name!r} has no encoder; the model has {sorted(model_config.encoders)}")
    proj = model_config.projectors.get(name)
    if proj is not None and proj.kind == "resampler":
        return int(proj.num_queries)
    enc = model_config.encoders[name]
    if hasattr(enc, "n_mels"):
        return whisper_frames(enc.num_frames)
    if enc.class_token:
        return clip_tokens(enc.image_size, enc.patch_size, keep_class_token=not enc.drop_class_token)
    return vit_patches(enc.image_size, enc.patch_size)
