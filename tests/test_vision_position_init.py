"""VisionConfig.position_init_std: the ViT position table is drawn at that std; everything else is untouched."""

import dataclasses

import jax
import numpy as np
from flax import nnx

from mllm_jax.config import VisionConfig
from mllm_jax.vision import VisionEncoder

from model_testlib import build

# 16x16 patches x 16 dims = 4096 draws: the sample std is within ~1.1% of the true std (one standard error).
VIT = VisionConfig(kind="vit", image_size=64, patch_size=4, d_model=16, n_layers=1, n_heads=2, d_ff=32,
                   activation="gelu", class_token=False, pre_norm=False, post_norm=True)


def test_default_keeps_clips_init():
    assert VisionConfig().position_init_std == 0.02  # HF ports and CLIP-style recipes keep 0.02


def test_position_table_scales_with_the_option_and_nothing_else_changes():
    small = nnx.state(build(VisionEncoder, VIT, 0))
    big = nnx.state(build(VisionEncoder, dataclasses.replace(VIT, position_init_std=1.0), 0))
    pos_small = np.asarray(small["position_embedding"][...])
    pos_big = np.asarray(big["position_embedding"][...])
    # Same key, same normal draws: the table is exactly the 0.02 table times 50.
    np.testing.assert_allclose(pos_big, pos_small * 50.0, rtol=1e-5)
    assert abs(pos_big.std() - 1.0) < 0.05  # ~4.5 standard errors of the sample std at n=4096
    others_small = jax.tree.leaves(nnx.to_pure_dict(small) | {"position_embedding": 0})
    others_big = jax.tree.leaves(nnx.to_pure_dict(big) | {"position_embedding": 0})
    for a, b in zip(others_small, others_big, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
