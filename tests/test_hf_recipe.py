"""Pretrained recipes: configs/llava_pretrained.gin pointed at tiny transformers checkpoints builds a
MultimodalModel whose LLM and vision tower compute what transformers computes on those weights."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _random(model):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model.eval()


def test_llava_pretrained_recipe_builds_from_hf_directories(tmp_path):
    import gin

    from mllm_jax import gin_setup
    from mllm_jax.config import ModelConfig
    from mllm_jax.hf.recipe import build_pretrained_config, create_pretrained_model, register
    from mllm_jax.parallel.config import ParallelConfig
    from mllm_jax.parallel.mesh import make_mesh

    llama = _random(transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=48)))
    clip = _random(transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2, image_size=16,
        patch_size=8)))
    llama.save_pretrained(str(tmp_path / "llm"))
    clip.save_pretrained(str(tmp_path / "clip"))

    gin.clear_config()
    register()
    gin_setup.parse([os.path.join(ROOT, "configs/llava_pretrained.gin")], [
        f'PretrainedConfig.llm = "{tmp_path / "llm"}"',
        f'PretrainedConfig.encoders = {{"vision": "{tmp_path / "clip"}"}}',
        'ModelConfig.dtype = "float32"',
    ])
    try:
        model_config, pretrained = gin_setup.build(ModelConfig), build_pretrained_config()
    finally:
        gin.clear_config()
    pc = ParallelConfig()
    mesh = make_mesh(pc, devices=jax.devices()[:1])
    model, cfg = create_pretrained_model(model_config, mesh, pc, pretrained)
    assert cfg.llm.d_model == 32 and cfg.encoders["vision"].d_model == 16 and cfg.lora.rank == 16

    ids = np.random.default_rng(0).integers(1, 64, (1, 9))
    with torch.no_grad():
        ref_logits = llama(torch.tensor(ids)).logits.numpy()
    pixels = np.random.default_rng(1).standard_normal((1, 16, 16, 3)).astype(np.float32)
    with torch.no_grad():
        hidden = clip(pixel_values=torch.tensor(pixels.transpose(0, 3, 1, 2)), output_hidden_states=True)
    ref_features = hidden.hidden_states[-2][:, 1:].numpy()  # LLaVA: layer -2, class token dropped

    with jax.set_mesh(mesh):
        with model.scope("llm"):
            logits = model.llm(jnp.asarray(ids))  # LoRA B starts at zero: the pretrained LLM exactly
        with model.scope("encoders/vision"):
            features = model.encoders["vision"](jnp.asarray(pixels))
    np.testing.assert_allclose(np.asarray(logits), ref_logits, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(features), ref_features, atol=1e-4, rtol=1e-4)
    assert np.abs(np.asarray(model.projectors["vision"].mlp.fc1.kernel.get_value())).sum() > 0  # fresh, not zero
