"""Tiny configs and batches shared by tests/test_model_*.py and tests/test_sharding*.py (not a test module), and the
helpers that keep those tests cheap: models built once per process, one model's weights placed into any layout.
(The cheap code generation every test program compiles with is set for the whole process by tests/conftest.py.)"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

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


def instances_batch(config: ModelConfig, *, rows: int, per_row: int, length: int, seed: int = 0):
    """``rows`` x ``length`` tokens, each row holding ``per_row`` images and ``per_row`` audio clips between text
    tokens, every instance used once (features flattened [N * T, D]; N = rows * per_row images and clips, so the
    encoder batch can be spread over several mesh axes). Labels = next token, -100 on placeholders."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, config.llm.vocab_size, (rows, length)).astype(np.int32)
    fi = {name: -np.ones((rows, length), np.int32) for name in ("vision", "audio")}
    span = np.zeros((rows, length), np.int32)
    n = {name: num_features(config, name) for name in fi}
    for r in range(rows):
        t, sid = 1, 1
        for j in range(per_row):
            for name, pid in (("vision", VISION_ID), ("audio", AUDIO_ID)):
                inst = per_row * r + j
                ids[r, t:t + n[name]] = pid
                fi[name][r, t:t + n[name]] = np.arange(inst * n[name], (inst + 1) * n[name])
                span[r, t:t + n[name]] = sid
                t, sid = t + n[name] + 1, sid + 1
        if t > length:
            raise ValueError(f"length {length} cannot hold {per_row} images and clips per row (needs {t})")
    v, a = config.encoders["vision"], config.encoders["audio"]
    nxt = np.concatenate([ids[:, 1:], np.zeros((rows, 1), np.int32)], axis=1)
    labels = np.where((nxt < 3) | (ids < 3), -100, nxt).astype(np.int32)
    labels[:, -1] = -100
    return dict(
        input_ids=ids, labels=labels, positions=np.tile(np.arange(length, dtype=np.int32), (rows, 1)),
        segment_ids=np.ones((rows, length), np.int32), span_ids=span, feature_index=fi,
        encoder_inputs={
            "vision": rng.normal(size=(rows * per_row, v.image_size, v.image_size, v.num_channels)).astype(np.float32),
            "audio": rng.normal(size=(rows * per_row, a.num_frames, a.n_mels)).astype(np.float32),
        },
    )


_BUILT: dict = {}


def build(cls, config, seed: int = 0, **kw):
    """``cls(config, rngs=nnx.Rngs(seed), **kw)``, initialised under one jit, once per process per arguments.

    Each call returns a fresh module (copied variables), so a test may mutate its model freely."""
    key = (cls, repr(config), seed, repr(sorted(kw.items())))
    if key not in _BUILT:
        make = lambda: cls(config, rngs=nnx.Rngs(seed), **kw)  # noqa: E731
        graphdef = nnx.graphdef(nnx.eval_shape(make))
        _BUILT[key] = graphdef, jax.jit(lambda: nnx.state(make()))()
    graphdef, state = _BUILT[key]
    return nnx.merge(graphdef, state, copy=True)


def place(model, abstract, mesh):
    """(graphdef, state) of ``abstract``'s layout on ``mesh`` (build.abstract_model) holding ``model``'s values:
    every layout of a test starts from the very same weights."""
    graphdef, target = nnx.split(abstract)
    shardings = jax.tree.map(lambda a: NamedSharding(mesh, a.sharding.spec), nnx.to_pure_dict(target))
    values = jax.device_put(nnx.to_pure_dict(nnx.state(model)), shardings)
    nnx.replace_by_pure_dict(target, values)
    return graphdef, target


def jit_call(fn, module, *args):
    """``fn(module, *args)`` under one jit: many eager calls cost one compile each per op."""
    graphdef, state = nnx.split(module)
    return jax.jit(lambda state, *a: fn(nnx.merge(graphdef, state), *a))(state, *args)


def make_every_tensor_count(torch_model) -> None:
    """Re-draw a transformers model's weights in place (torch seeded by the caller): HF's init (std 0.02, norms 1,
    biases 0) leaves attention near uniform and hides the norm and bias terms, so a parity test could pass with
    them wrong. Norms get 1 + noise, matrices fan-in-scaled normals, vectors N(0, 0.1)."""
    import torch

    with torch.no_grad():
        for name, p in torch_model.named_parameters():
            if "norm" in name or "ln_q" in name:
                p.add_(0.1 * torch.randn_like(p))
            elif p.ndim > 1:
                p.normal_(0.0, p[0].numel() ** -0.5)
            else:
                p.normal_(0.0, 0.1)
