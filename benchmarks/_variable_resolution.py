"""The variable-resolution workload shared by the balance benchmarks: images at their own size and some videos, as a
Qwen2-VL/Qwen2.5-VL processor turns them into patches and LLM tokens.

Images: area log-normal (median ~0.4 MP, a long tail of multi-megapixel photos), aspect ratio log-uniform in
[1/3, 3]. Videos (``video_fraction`` of the instances): 2-60 s at 30 fps, 640x360 to 1280x720, sampled at the
processor's fps with its video pixel bounds. Grids, patch and token counts come from the processor's own functions
(mllm_jax.data.processor.native_vision), so the benchmarks see what the data pipeline would build.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from mllm_jax.config import LLMConfig, ModelConfig, NativeVisionConfig, ProjectorConfig
from mllm_jax.data.processor.native_vision import NativeVisionProcessor, sample_frames, smart_resize, token_count


def qwen25vl_7b() -> ModelConfig:
    """Qwen2.5-VL-7B's shapes (tower frozen, as in most fine-tuning recipes): configs/qwen25vl_7b.gin's model."""
    tower = NativeVisionConfig(kind="qwen2_5_vl", d_model=1280, n_layers=32, n_heads=16, d_ff=3420,
                               activation="silu", window_size=112, full_attention_layers=(7, 15, 23, 31),
                               tokens_per_second=2.0, patches_per_row=16384)
    llm = LLMConfig(vocab_size=152064, d_model=3584, n_layers=28, n_heads=28, n_kv_heads=4, d_ff=18944,
                    norm_eps=1e-6, qkv_bias=True, rope_theta=1e6, max_position_embeddings=128000)
    merger = ProjectorConfig(kind="patch_merger", merge_size=2, norm="rms")
    return ModelConfig(llm=llm, encoders={"vision": tower}, projectors={"vision": merger},
                       placeholder_ids={"vision": 151655}, trainable={"encoders/vision": False})


@dataclass(frozen=True)
class Instance:
    kind: str  # "image" | "video"
    grid_thw: tuple[int, int, int]
    merge_size: int

    @property
    def patches(self) -> int:
        t, h, w = self.grid_thw
        return t * h * w

    @property
    def tokens(self) -> int:
        return token_count(self.grid_thw, self.merge_size)


def draw_instance(rng: np.random.Generator, proc: NativeVisionProcessor, *, video_fraction: float = 0.1,
                  max_video_seconds: float = 60.0) -> Instance:
    """One image or video, as the processor would grid it."""
    if rng.random() < video_fraction:
        seconds = float(rng.uniform(2.0, max_video_seconds))
        height = int(rng.choice([360, 480, 720]))
        width = height * 16 // 9
        frames = sample_frames(int(seconds * 30), 30.0, proc.fps, temporal_patch_size=proc.temporal_patch_size,
                               min_frames=proc.min_frames, max_frames=proc.max_frames)
        h, w = smart_resize(height, width, proc.factor, proc.video_min_pixels, proc.video_max_pixels)
        t = math.ceil(len(frames) / proc.temporal_patch_size)
        return Instance("video", (t, h // proc.patch_size, w // proc.patch_size), proc.merge_size)
    area = float(np.exp(rng.normal(np.log(0.4e6), 0.9)))
    aspect = float(np.exp(rng.uniform(np.log(1 / 3), np.log(3))))
    height, width = max(28, int(math.sqrt(area / aspect))), max(28, int(math.sqrt(area * aspect)))
    h, w = smart_resize(height, width, proc.factor, proc.min_pixels, proc.max_pixels)
    return Instance("image", (1, h // proc.patch_size, w // proc.patch_size), proc.merge_size)


def draw_samples(rng: np.random.Generator, n: int, proc: NativeVisionProcessor, *, max_tokens: int,
                 max_patches: int, max_instances: int = 4,
                 video_fraction: float = 0.1) -> list[tuple[int, list[Instance]]]:
    """n samples (text tokens, instances): 0..max_instances instances each, log-normal text; an instance that would
    push a sample past ``max_tokens``, or that is longer than a patch row (``max_patches``), is dropped (the data
    loader would refuse it)."""
    out = []
    for _ in range(n):
        text = int(min(rng.lognormal(5.0, 1.0) + 16, max_tokens // 2))
        insts = []
        for _ in range(int(rng.integers(0, max_instances + 1))):
            inst = draw_instance(rng, proc, video_fraction=video_fraction)
            if text + sum(i.tokens for i in insts) + inst.tokens <= max_tokens and inst.patches <= max_patches:
                insts.append(inst)
        out.append((text, insts))
    return out
