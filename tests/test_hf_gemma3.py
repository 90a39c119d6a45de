"""Gemma 3 multimodal (Gemma3ForConditionalGeneration) against PyTorch transformers: the pooling projector alone, the
config map, logits on a batch with several images (each image's tokens one bidirectional span), and export.

One tiny random transformers model per module (CPU, float32), saved once; oracles: its forward passes, its own mask
functions, and transformers reloading what we write.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mllm_jax import kernels
from mllm_jax.config import ProjectorConfig
from mllm_jax.hf import config_map as cm
from mllm_jax.hf import load_pretrained, save_pretrained
from mllm_jax.projector import Projector

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

IMAGE, BOI, EOI = 60, 61, 62  # ids inside the tiny vocabulary (the real ones are 262144, 255999, 256000)
TOKENS_PER_IMAGE = 4  # a 4x4 patch grid (16 px / 4 px) pooled 2x2 -> 2x2
WINDOW = 6  # the local layers' window: shorter than the sequence, so it binds, and >= TOKENS_PER_IMAGE


def _hf_config():
    text = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                head_dim=8, intermediate_size=48, max_position_embeddings=64, sliding_window=WINDOW,
                query_pre_attn_scalar=8, layer_types=["sliding_attention", "full_attention"])
    vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4, image_size=16,
                  patch_size=4, vision_use_head=False)
    return transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=TOKENS_PER_IMAGE,
                                     image_token_index=IMAGE, boi_token_index=BOI, eoi_token_index=EOI)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """(the transformers model with random weights, the directory it saved)."""
    torch.manual_seed(0)
    model = transformers.Gemma3ForConditionalGeneration(_hf_config())
    with torch.no_grad():  # large enough that every term matters (norm weights 0 and biases 0 otherwise)
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    path = str(tmp_path_factory.mktemp("gemma3") / "hf")
    model.eval().save_pretrained(path)
    return model, path


@pytest.fixture(scope="module")
def ours(hf_dir):
    return load_pretrained(hf_dir[1])


def _inputs():
    """Two rows of 20 tokens laid out as HF's processor lays an image out (boi, TOKENS_PER_IMAGE image tokens, eoi):
    row 0 holds two images, row 1 one. Returns (ids [2, 20], token_type_ids, pixels NHWC [3, 16, 16, 3], our batch)."""
    rng = np.random.default_rng(0)
    ids = rng.integers(3, IMAGE, (2, 20))
    image = [BOI] + [IMAGE] * TOKENS_PER_IMAGE + [EOI]
    ids[0, 2:8] = ids[0, 11:17] = ids[1, 7:13] = image
    pixels = rng.standard_normal((3, 16, 16, 3)).astype(np.float32)
    is_image = ids == IMAGE
    fi = np.full(ids.shape, -1, np.int32)
    fi[is_image] = np.arange(is_image.sum())  # row-major: HF's masked_scatter order, images in pixel order
    span = np.zeros(ids.shape, np.int32)
    span[is_image] = 1 + np.arange(is_image.sum()) // TOKENS_PER_IMAGE  # one span per image
    batch = {"input_ids": jnp.asarray(ids, jnp.int32), "positions": jnp.asarray(np.tile(np.arange(20), (2, 1)), jnp.int32),
             "segment_ids": jnp.ones(ids.shape, jnp.int32), "span_ids": jnp.asarray(span),
             "encoder_inputs": {"vision": jnp.asarray(pixels)}, "feature_index": {"vision": jnp.asarray(fi)}}
    return ids, is_image.astype(np.int64), pixels, batch


def _hf_logits(model, ids, token_type_ids, pixels):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), token_type_ids=torch.tensor(token_type_ids),
                     pixel_values=torch.tensor(pixels.transpose(0, 3, 1, 2))).logits.numpy()


def _our_logits(model, batch):
    graphdef, state = nnx.split(model)
    return np.asarray(nnx.jit(lambda m, b: m.llm.logits(m(b)))(model, batch))


# --------------------------------------------------------------------------------------------------- projector


def test_projector_matches_transformers_module(hf_dir):
    """Pooling, (1 + w) norm and projection against Gemma3MultiModalProjector alone, to 1e-5."""
    hf = hf_dir[0].model.multi_modal_projector
    cfg = ProjectorConfig(kind="gemma3", tokens_per_image=TOKENS_PER_IMAGE, norm_eps=1e-6)
    proj = Projector(cfg, 32, 32, rngs=nnx.Rngs(0))
    proj.norm.scale[...] = jnp.asarray(hf.mm_soft_emb_norm.weight.detach().numpy())
    proj.proj.kernel[...] = jnp.asarray(hf.mm_input_projection_weight.detach().numpy())  # [in, out] both sides
    x = np.random.default_rng(1).standard_normal((3, 16, 32)).astype(np.float32)
    with torch.no_grad():
        ref = hf(torch.tensor(x)).numpy()
    out = np.asarray(proj(jnp.asarray(x)))
    assert out.shape == (3, TOKENS_PER_IMAGE, 32)
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)


def test_projector_token_count_and_refusals():
    cfg = ProjectorConfig(kind="gemma3", tokens_per_image=4)
    assert cfg.output_tokens(16) == 4 and cfg.output_tokens(36) == 4  # 4x4 and 6x6 grids pooled to 2x2
    for bad_grid in (15, 25):  # not a square; a 5x5 grid does not pool evenly to 2x2
        with pytest.raises(ValueError, match=f"{bad_grid}"):
            cfg.output_tokens(bad_grid)
    with pytest.raises(ValueError, match="tokens_per_image=5"):
        ProjectorConfig(kind="gemma3", tokens_per_image=5).output_tokens(16)


def test_projector_costs_count_the_pooled_tokens():
    """costs.projector_layer against the module itself: its parameter count, and the projection's FLOPs on the
    tokens it actually emits (3 images of 16 patches pooled to 4 tokens each)."""
    from mllm_jax import costs

    cfg = ProjectorConfig(kind="gemma3", tokens_per_image=TOKENS_PER_IMAGE)
    proj = Projector(cfg, 32, 48, rngs=nnx.Rngs(0))
    out = proj(jnp.zeros((3, 16, 32)))
    layer = costs.projector_layer("vision", cfg, 32, 48, 3 * 16, instances=3)
    assert layer.params == sum(v.size for v in jax.tree.leaves(nnx.state(proj, nnx.Param)))
    assert layer.weight_flops == 2.0 * out.shape[0] * out.shape[1] * 32 * 48
    with pytest.raises(ValueError, match="do not split over 5 instances"):
        costs.projector_layer("vision", cfg, 32, 48, 3 * 16, instances=5)
