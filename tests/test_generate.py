"""KV-cache generation (mllm_jax.decode) against the uncached forward: the oracle is the model's own training forward
on prompt + generated tokens (teacher forcing), whose logits at every step must equal the cached step's and whose
argmax must be the greedy token, per family (Llama with rope scaling, Qwen2-style GQA with biases, Mistral with a
window shorter than the sequence, Gemma 2 with soft-caps and alternating windows, a Qwen3-MoE-like model with q/k
norms and mixed dense / MoE layers), for batched prompts of different lengths and for a multimodal prompt (an image
injected)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mllm_jax import decode
from mllm_jax.config import LLMConfig, RopeScaling, RunSettings
from mllm_jax.llm import LLM
from mllm_jax.multimodal import MultimodalModel
from model_testlib import VISION_ID, build, jit_call, tiny_batch, tiny_config

BASE = dict(vocab_size=64, d_model=32, n_layers=3, n_heads=4, n_kv_heads=4, d_ff=48)
FAMILIES = {
    "llama_rope_scaling": LLMConfig(**BASE, rope_scaling=RopeScaling(factor=8.0, original_max_position_embeddings=8)),
    "qwen2_gqa": LLMConfig(**{**BASE, "n_kv_heads": 1}, qkv_bias=True, tie_embeddings=True),
    "mistral_window": LLMConfig(**{**BASE, "n_kv_heads": 2}, sliding_window=3),
    "gemma2": LLMConfig(**{**BASE, "n_kv_heads": 2}, head_dim=8, sliding_window=4, sliding_window_pattern=2,
                        attn_logit_softcap=5.0, final_logit_softcap=8.0, query_pre_attn_scalar=8.0, post_norms=True,
                        norm_scale_plus_one=True, embed_scale=True, tie_embeddings=True, activation="gelu_tanh"),
    # Qwen3-MoE-like: q/k norms, mixture-of-experts MLPs on every other layer (dense and MoE layers stacked apart)
    "moe_qk_norm": LLMConfig(**{**BASE, "n_kv_heads": 2}, qk_norm=True, n_experts=4, experts_per_token=2,
                             moe_d_ff=24, moe_layer_freq=2),
}
PROMPTS = [np.array([5, 9, 17, 33, 2, 41, 8, 60, 12]), np.array([7, 3, 50]), np.array([21, 22, 23, 24, 25])]
STEPS = 7


def _randomize(model, seed=1, std=0.3):
    """Weights large enough that logits are far apart (the 0.02 init leaves near-ties)."""
    state = nnx.state(model, nnx.Param)
    leaves, tree = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    leaves = [x + std * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    nnx.update(model, jax.tree.unflatten(tree, leaves))
    return model


def _check_against_uncached(llm, prompts, out, steps):
    for r, p in enumerate(prompts):
        n = int(out.lengths[r])
        full = np.concatenate([p, out.tokens[r, :n]])[None]
        ref = np.asarray(jit_call(lambda m, ids: m(ids), llm, jnp.asarray(full)))[0, len(p) - 1:len(p) - 1 + n]
        np.testing.assert_allclose(out.logits[r, :n], ref, atol=2e-4, rtol=2e-4, err_msg=f"row {r}")
        np.testing.assert_array_equal(ref.argmax(-1), out.tokens[r, :n], err_msg=f"row {r}")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_cached_greedy_decode_equals_the_uncached_forward(family):
    # Gemma 2 also with unrolled layers (its windows then static per layer; the cost-analysis form)
    run = RunSettings(layer_loop="unrolled") if family == "gemma2" else RunSettings()
    llm = _randomize(LLM(FAMILIES[family], rngs=nnx.Rngs(0), run=run))
    out = decode.generate(llm, decode.text_batch(PROMPTS), max_new_tokens=STEPS, return_logits=True)
    assert out.tokens.shape == (3, STEPS) and (out.lengths == STEPS).all()
    _check_against_uncached(llm, PROMPTS, out, STEPS)


def _vision_only():
    full = tiny_config()
    return full.replace(**{k: {"vision": getattr(full, k)["vision"]}
                           for k in ("encoders", "projectors", "placeholder_ids")})


def test_multimodal_prompt_decode_equals_the_uncached_forward():
    """Image features injected at their placeholders (span ids: an image's tokens see each other both ways), prompts
    of different lengths (left-padded inside generate), against model(batch) on prompt + generated tokens."""
    cfg = _vision_only()
    model = _randomize(build(MultimodalModel, cfg))
    full = tiny_batch(cfg, length=16, with_audio=False)
    cut = [16, 9]  # row 1 keeps its image run (tokens 3..6)
    batch = {k: v.copy() for k, v in full.items() if k not in ("encoder_inputs", "feature_index", "labels")}
    batch["encoder_inputs"], batch["feature_index"] = full["encoder_inputs"], {
        k: v.copy() for k, v in full["feature_index"].items()}
    for r, n in enumerate(cut):
        for k in ("segment_ids",):
            batch[k][r, n:] = 0
        for fi in batch["feature_index"].values():
            fi[r, n:] = -1
        batch["span_ids"][r, n:] = 0
        batch["input_ids"][r, n:] = 0
    steps = 5
    out = decode.generate(model, batch, max_new_tokens=steps, return_logits=True)
    for r, n in enumerate(cut):
        ids = np.concatenate([full["input_ids"][r, :n], out.tokens[r]])
        s = len(ids)
        one = {"input_ids": ids[None], "positions": np.arange(s, dtype=np.int32)[None],
               "segment_ids": np.ones((1, s), np.int32),
               "span_ids": np.concatenate([full["span_ids"][r, :n], np.zeros(steps, np.int32)])[None],
               "encoder_inputs": full["encoder_inputs"],
               "feature_index": {k: np.concatenate([v[r, :n], -np.ones(steps, np.int32)])[None]
                                 for k, v in full["feature_index"].items()}}
        ref = np.asarray(jit_call(lambda m, b: m.llm.logits(m(b)), model, one))[0, n - 1:n - 1 + steps]
        np.testing.assert_allclose(out.logits[r], ref, atol=2e-4, rtol=2e-4, err_msg=f"row {r}")
        np.testing.assert_array_equal(ref.argmax(-1), out.tokens[r])
    assert (full["input_ids"][:, :9] == VISION_ID).sum(1).tolist() == [4, 4]


def test_stop_tokens_end_each_row_and_pad_after():
    llm = _randomize(LLM(FAMILIES["llama_rope_scaling"], rngs=nnx.Rngs(0)))
    free = decode.generate(llm, decode.text_batch(PROMPTS), max_new_tokens=STEPS)
    stop = int(free.tokens[0, 2])  # row 0 stops at its third token
    out = decode.generate(llm, decode.text_batch(PROMPTS), max_new_tokens=STEPS, stop_tokens=(stop,), pad_id=63)
    for r in range(3):
        hits = np.flatnonzero(free.tokens[r] == stop)
        n = int(hits[0]) + 1 if hits.size else STEPS
        assert out.lengths[r] == n, (r, out.lengths, free.tokens)
        np.testing.assert_array_equal(out.tokens[r, :n], free.tokens[r, :n])
        assert (out.tokens[r, n:] == 63).all()
    assert out.lengths[0] <= 3


def test_sampling_is_reproducible_per_seed_and_respects_top_k_top_p():
    llm = _randomize(LLM(FAMILIES["qwen2_gqa"], rngs=nnx.Rngs(0)), std=0.1)
    batch = decode.text_batch(PROMPTS)
    runs = {}
    for name, sampling in {"temp": decode.SamplingConfig(temperature=1.5, seed=3),
                           "top_k": decode.SamplingConfig(temperature=1.5, top_k=3, seed=3),
                           "top_p": decode.SamplingConfig(temperature=1.5, top_p=0.5, seed=3)}.items():
        a = decode.generate(llm, batch, max_new_tokens=12, sampling=sampling, return_logits=True)
        b = decode.generate(llm, batch, max_new_tokens=12, sampling=sampling, return_logits=True)
        np.testing.assert_array_equal(a.tokens, b.tokens, err_msg=name)
        other = decode.generate(llm, batch, max_new_tokens=12, sampling=dataclasses.replace(sampling, seed=4),
                                return_logits=True)
        assert not np.array_equal(a.tokens, other.tokens), name
        runs[name] = a
    greedy = decode.generate(llm, batch, max_new_tokens=12, return_logits=True)
    assert not np.array_equal(runs["temp"].tokens, greedy.tokens)  # sampling is not argmax
    logits = runs["top_k"].logits / 1.5
    top3 = np.argsort(-logits, axis=-1)[..., :3]
    assert (top3 == runs["top_k"].tokens[..., None]).any(-1).all()
    logits = runs["top_p"].logits / 1.5
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    chosen = np.take_along_axis(p, runs["top_p"].tokens[..., None], -1)
    mass_above = np.where(p > chosen, p, 0).sum(-1)  # probability of the tokens more likely than the chosen one
    assert (mass_above[..., 0] < 0.5).all()


def test_a_prompt_longer_than_the_cache_is_refused_naming_the_numbers():
    llm = LLM(FAMILIES["mistral_window"], rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"9 tokens.*max_new_tokens=4.*13 cache slots.*cache_len=10"):
        decode.generate(llm, decode.text_batch(PROMPTS), max_new_tokens=4, cache_len=10)


def test_an_image_whose_features_do_not_match_the_placeholders_is_refused():
    cfg = _vision_only()
    model = build(MultimodalModel, cfg)
    batch = tiny_batch(cfg, length=16, with_audio=False)
    n = int((batch["input_ids"][0] == VISION_ID).sum())
    batch["input_ids"][0, np.flatnonzero(batch["input_ids"][0] == VISION_ID)[-1]] = 9  # one placeholder fewer
    with pytest.raises(ValueError, match=rf"sample 0: {n - 1} 'vision' placeholder tokens but {n} 'vision' features"):
        decode.generate(model, batch, max_new_tokens=2)


def test_a_model_on_a_mesh_generates_in_place_like_its_one_device_copy():
    """A model built on a mesh (data=2 x fsdp=4; a text-only model with a sliding window) generates where it lies, the
    same tokens as its one-device copy (tests/test_generate_sharded.py: more layouts, multimodal prompts). A one-device
    model called under a mesh, and a bare LLM laid out over devices (no logical rules), are refused naming why."""
    from mllm_jax.build import create_model
    from mllm_jax.config import ModelConfig
    from mllm_jax.parallel.config import ParallelConfig
    from mllm_jax.parallel.mesh import make_mesh
    from mllm_jax.train.workdir import on_one_device

    pc = ParallelConfig(data=2, fsdp=4)
    mesh = make_mesh(pc)
    model = create_model(ModelConfig(llm=FAMILIES["mistral_window"]), mesh, pc)
    batch = decode.text_batch(PROMPTS)
    out = decode.generate(model, batch, max_new_tokens=3, return_logits=True)
    one = decode.generate(on_one_device(model), batch, max_new_tokens=3, return_logits=True)
    np.testing.assert_array_equal(out.tokens, one.tokens)
    np.testing.assert_allclose(out.logits, one.logits, atol=2e-4, rtol=2e-4)
    _check_against_uncached(on_one_device(model).llm, PROMPTS, one, 3)
    with jax.set_mesh(mesh), pytest.raises(ValueError, match="on one device but generate was called under a mesh "
                                                             "of 8 devices.*outside_mesh"):
        decode.generate(on_one_device(model), batch, max_new_tokens=2)
    with pytest.raises(ValueError, match="laid out over 8 devices needs its logical rules.*create_model.*got LLM"):
        decode.generate(model.llm, batch, max_new_tokens=2)
