"""Tiny configs and batches shared by tests/test_model_*.py and tests/test_sharding*.py (not a test module)."""

from __future__ import annotations

import numpy as np

from mllm_jax.config import AudioConfig, LLMConfig, ModelConfig, ProjectorConfig, VisionConfig
from mllm_jax.multimodal import num_features

TINY_LLM = LLMConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48)
TINY_VISION = VisionConfig(image_size=8, patch_size=4, d_model=16, n_layers=2, n_heads=2, d_ff=32, select_layer=-2)
TINY_AUDIO = AudioConfig(n_mels=8, max_source_positions=4, d_model=16, n_layers=1, n_heads=2, d_ff=32)
VISION_ID, AUDIO_ID = 1, 2


def tiny_config(**kw) -> ModelConfig:
    base = dict(
        llm=TINY_LLM,
        encoders={"vision": TINY_VISION, "audio": TINY_AUDIO},
        projectors={"vision": ProjectorConfig(kind="mlp"),
                    "audio": ProjectorConfig(kind="resampler", num_queries=2, n_heads=2)},
        placeholder_ids={"vision": VISION_ID, "audio": AUDIO_ID},
    )
    base.update(kw)
    return ModelConfig(**base)


def tiny_batch(config: ModelConfig, *, batch: int = 2, length: int = 16, seed: int = 0, with_audio: bool = True):
    """Sample 0: one image; sample 1: one image and (optionally) one audio clip. Labels = next token, -100 on
    placeholders. Encoder batches: 2 images, 1 clip (+1 unused zero row)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, config.llm.vocab_size, (batch, length)).astype(np.int32)
    nv = num_features(config, "vision")
    fi_v = -np.ones((batch, length), np.int32)
    span = np.zeros((batch, length), np.int32)
    ids[0, 2:2 + nv] = VISION_ID
    fi_v[0, 2:2 + nv] = np.arange(nv)
    span[0, 2:2 + nv] = 1
    ids[1, 3:3 + nv] = VISION_ID
    fi_v[1, 3:3 + nv] = np.arange(nv, 2 * nv)
    span[1, 3:3 + nv] = 1
    out = dict(
        input_ids=ids,
        positions=np.tile(np.arange(length, dtype=np.int32), (batch, 1)),
        segment_ids=np.ones((batch, length), np.int32),
        span_ids=span,
        encoder_inputs={"vision": rng.normal(size=(2, 8, 8, 3)).astype(np.float32)},
        feature_index={"vision": fi_v},
    )
    if with_audio:
        na = num_features(config, "audio")
        fi_a = -np.ones((batch, length), np.int32)
        start = 3 + nv + 1
        ids[1, start:start + na] = AUDIO_ID
        fi_a[1, start:start + na] = np.arange(na)
        span[1, start:start + na] = 2
        out["encoder_inputs"]["audio"] = np.concatenate(
            [rng.normal(size=(1, 8, 8)), np.zeros((1, 8, 8))]).astype(np.float32)
        out["feature_index"]["audio"] = fi_a
    nxt = np.concatenate([ids[:, 1:], np.zeros((batch, 1), np.int32)], axis=1)
    labels = np.where((nxt < 3) | (ids < 3), -100, nxt).astype(np.int32)
    labels[:, -1] = -100
    out["labels"] = labels
    return out


def build(cls, config, seed: int = 0, **kw):
    """Construct a module under one jit (eager construction compiles every initializer separately: slow)."""
    from flax import nnx

    return nnx.jit(lambda: cls(config, rngs=nnx.Rngs(seed), **kw))()
