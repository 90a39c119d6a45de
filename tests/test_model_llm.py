"""The decoder LLM and its building blocks: math properties, the mask rule through the whole model, options."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mllm_jax.kernels.meta import TokenMeta
from mllm_jax import layers as L
from mllm_jax.config import RopeScaling
from mllm_jax.config import RunSettings
from mllm_jax.llm import LLM

from model_testlib import TINY_LLM, build, jit_call

GEMMA2 = dataclasses.replace(
    TINY_LLM, head_dim=12, activation="gelu_tanh", norm_scale_plus_one=True, embed_scale=True, tie_embeddings=True,
    attn_logit_softcap=5.0, final_logit_softcap=3.0, query_pre_attn_scalar=16.0, post_norms=True,
    sliding_window=2, sliding_window_pattern=2)


def _meta(b, s):
    return TokenMeta.causal(b, s, xp=jnp)


@pytest.fixture(scope="module")
def llm():
    return build(LLM, TINY_LLM, 0)


def test_shapes_and_dtypes(llm):
    ids = np.arange(12, dtype=np.int32).reshape(2, 6)
    logits, h = jax.eval_shape(lambda: (llm(ids, _meta(2, 6)), llm.hidden(llm.embed(ids), _meta(2, 6))))
    assert logits.shape == (2, 6, 64) and logits.dtype == jnp.float32
    assert h.shape == (2, 6, 32) and h.dtype == jnp.float32
    layer_params, _ = llm.layer_params()
    assert layer_params["attn"]["q"]["kernel"].shape == (2, 32, 4, 8)  # stacked [layers, D, H, Dh]
    assert layer_params["attn"]["k"]["kernel"].shape == (2, 32, 2, 8)  # GQA
    bf = build(LLM, TINY_LLM, run=RunSettings(dtype="bfloat16"))
    assert jax.eval_shape(lambda: bf.hidden(bf.embed(ids), _meta(2, 6))).dtype == jnp.bfloat16
    assert nnx.state(bf)["embed"]["embedding"][...].dtype == jnp.float32  # parameters stay fp32


def test_causal_and_span_mask_through_the_model(llm):
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 64, (1, 10)).astype(np.int32)
    span = np.zeros((1, 10), np.int32)
    span[0, 3:6] = 1  # an "image" of 3 tokens
    meta = TokenMeta(np.arange(10, dtype=np.int32)[None], np.ones((1, 10), np.int32), span)
    ids2 = ids.copy()
    ids2[0, 5] = (ids[0, 5] + 1) % 64  # the last token of the span
    ids3 = ids.copy()
    ids3[0, 8] = (ids[0, 8] + 1) % 64
    a, b, c = (np.asarray(x) for x in jit_call(lambda m: [m(i, meta) for i in (ids, ids2, ids3)], llm))
    np.testing.assert_array_equal(a[0, :3], b[0, :3])  # text before the span cannot see it
    assert np.abs(a[0, 3] - b[0, 3]).max() > 1e-4  # span tokens see each other both ways
    assert np.abs(a[0, 6:] - b[0, 6:]).max() > 1e-4  # later text sees it
    np.testing.assert_array_equal(a[0, :8], c[0, :8])


def test_packed_samples_equal_separate_runs(llm):
    rng = np.random.default_rng(2)
    s1, s2 = rng.integers(0, 64, 5), rng.integers(0, 64, 6)
    packed = np.zeros((1, 12), np.int32)
    packed[0, :5], packed[0, 5:11] = s1, s2
    pos = np.zeros((1, 12), np.int32)
    pos[0, :5], pos[0, 5:11] = np.arange(5), np.arange(6)
    seg = np.zeros((1, 12), np.int32)
    seg[0, :5], seg[0, 5:11] = 1, 2  # last token is padding
    out, alone1, alone2 = (np.asarray(x) for x in jit_call(
        lambda m: (m(packed, TokenMeta(pos, seg, np.zeros_like(seg))), m(s1[None].astype(np.int32), _meta(1, 5)),
                   m(s2[None].astype(np.int32), _meta(1, 6))), llm))
    np.testing.assert_allclose(out[0, :5], alone1[0], atol=1e-5)
    np.testing.assert_allclose(out[0, 5:11], alone2[0], atol=1e-5)


def test_rope_depends_only_on_relative_position():
    rng = np.random.default_rng(3)
    q, k = rng.normal(size=(2, 1, 1, 1, 16)).astype(np.float32)
    inv = L.rope_inv_freq(16, 10000.0)

    def score(pq, pk):
        cq, sq = L.rope_cos_sin(jnp.array([[pq]]), inv)
        ck, sk = L.rope_cos_sin(jnp.array([[pk]]), inv)
        return float(jnp.sum(L.apply_rope(q, cq, sq) * L.apply_rope(k, ck, sk)))

    assert score(7, 3) == pytest.approx(score(107, 103), rel=1e-4)
    assert score(7, 3) != pytest.approx(score(7, 5), rel=1e-3)


def test_llama3_rope_scaling_bounds():
    sc = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64)
    base, scaled = L.rope_inv_freq(32, 500000.0), L.rope_inv_freq(32, 500000.0, sc)
    wavelen = 2 * math.pi / base
    high = wavelen < 64 / 4.0
    low = wavelen > 64 / 1.0
    assert high.any() and low.any() and (~high & ~low).any()
    np.testing.assert_allclose(scaled[high], base[high])  # short wavelengths untouched
    np.testing.assert_allclose(scaled[low], base[low] / 8.0, rtol=1e-6)  # long ones slowed by the factor
    mid = ~high & ~low
    assert np.all(scaled[mid] <= base[mid]) and np.all(scaled[mid] >= base[mid] / 8.0)


def test_norms_match_closed_form():
    x = np.random.default_rng(4).normal(size=(2, 3, 8)).astype(np.float32)
    w = np.linspace(0.5, 1.5, 8).astype(np.float32)
    rms = x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(L.rms_norm({"scale": w}, x, 1e-6), rms * w, rtol=1e-5)
    np.testing.assert_allclose(L.rms_norm({"scale": w}, x, 1e-6, plus_one=True), rms * (1 + w), rtol=1e-5)
    ln = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(L.layer_norm({"scale": w, "bias": w}, x, 1e-5), ln * w + w, rtol=1e-4, atol=1e-5)


def test_gemma2_options():
    m = build(LLM, GEMMA2, 0)
    ids = np.random.default_rng(5).integers(0, 64, (1, 6)).astype(np.int32)
    table = np.asarray(nnx.state(m)["embed"]["embedding"][...])
    emb, logits, h = jit_call(lambda m: (m.embed(ids), m(ids, _meta(1, 6)), m.hidden(m.embed(ids), _meta(1, 6))), m)
    np.testing.assert_allclose(emb, table[ids] * math.sqrt(32), rtol=1e-6)
    logits = np.asarray(logits)
    assert logits.shape == (1, 6, 64) and np.abs(logits).max() <= 3.0  # final softcap bounds the logits
    np.testing.assert_allclose(logits, 3.0 * np.tanh(np.einsum("bsd,vd->bsv", h, table) / 3.0), atol=1e-5)
    assert "post_attn_norm" in nnx.state(m)["layers"] and "lm_head" not in nnx.state(m)


def test_sliding_window_per_layer():
    """Gemma-2 pattern: layer 0 is local (window 2), layer 1 global. Token 0 reaches position 3 only globally."""
    m = build(LLM, GEMMA2, 1)
    ids = np.random.default_rng(6).integers(0, 64, (1, 6)).astype(np.int32)
    ids2 = ids.copy()
    ids2[0, 0] = (ids[0, 0] + 1) % 64
    meta = _meta(1, 6)

    def run(m):
        one = jax.tree.map(lambda a: a[:1], m.layer_params()[0])
        return [[m.apply_layers(one, m.embed(i), meta, first_layer=f) for i in (ids, ids2)] for f in (0, 1)]

    outs = jit_call(run, m)
    for (first_layer, reaches), (a, b) in zip(((0, False), (1, True)), outs):
        assert (np.abs(np.asarray(a - b))[0, 3].max() > 1e-5) == reaches
        assert np.abs(np.asarray(a - b))[0, 1].max() > 1e-5  # within the window either way


def test_apply_layers_slices_compose(llm):
    """Running layers [0, 1) then [1, 2) as pure functions equals the full stack (what the pipeline does)."""
    ids = np.arange(8, dtype=np.int32)[None]
    meta = _meta(1, 8)

    def both(llm):
        e, params = llm.embed(ids), llm.layer_params()[0]
        h = llm.apply_layers(jax.tree.map(lambda a: a[:1], params), e, meta, first_layer=0)
        h = llm.apply_layers(jax.tree.map(lambda a: a[1:], params), h, meta, first_layer=1)
        return llm.final(h), llm.hidden(e, meta)

    sliced, whole = jit_call(both, llm)
    np.testing.assert_allclose(sliced, whole, atol=1e-6)


def test_qwen2_bias_and_untied_head():
    cfg = dataclasses.replace(TINY_LLM, qkv_bias=True)
    m = build(LLM, cfg, 0)
    st = nnx.state(m)
    assert st["layers"]["attn"]["q"]["bias"][...].shape == (2, 4, 8)
    assert "bias" not in st["layers"]["attn"]["o"]


def test_bad_inputs_refused(llm):
    with pytest.raises(ValueError, match=r"\[0, 64\).*max 70"):
        llm(np.array([[1, 70]], np.int32), _meta(1, 2))
    with pytest.raises(ValueError, match=r"tokens' shape \(1, 4\)"):
        llm.hidden(llm.embed(np.zeros((1, 4), np.int32)), _meta(1, 3))
    with pytest.raises(ValueError, match="n_kv_heads"):
        LLM(dataclasses.replace(TINY_LLM, n_kv_heads=3), rngs=nnx.Rngs(0))
