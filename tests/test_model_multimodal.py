"""MultimodalModel: injection, absent modalities, the loss, freezing/LoRA after an optimizer step, bad inputs."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from mllm_jax import MultimodalModel, check_batch, trainable_filter
from mllm_jax.config import LoRAConfig, ProjectorConfig
from mllm_jax.layers import LoRAParam

from model_testlib import TINY_VISION, build, jit_call, tiny_batch, tiny_config


@pytest.fixture(scope="module")
def config():
    return tiny_config()


@pytest.fixture(scope="module")
def model(config):
    return build(MultimodalModel, config, 0)


@pytest.fixture(scope="module")
def batch(config):
    return tiny_batch(config)


def test_shapes_and_injection(model, config, batch):
    def parts(m, b):
        x = b["encoder_inputs"]
        return (m.encode("vision", x["vision"]), m.encode("audio", x["audio"]), m.encoders["vision"](x["vision"]),
                m.encoders["audio"](x["audio"]), m.embed(b), m.llm.embed(b["input_ids"]), m(b))

    vis, aud, vis_enc, aud_enc, emb, text, h = jit_call(parts, model, batch)
    assert vis.shape == (2, 4, 32) and aud.shape == (2, 2, 32)  # 4 patches (class token dropped), 2 queries
    assert vis_enc.shape == (2, 4, 16) and aud_enc.shape == (2, 4, 16)
    emb, text = np.asarray(emb), np.asarray(text)
    fv, fa = batch["feature_index"]["vision"], batch["feature_index"]["audio"]
    np.testing.assert_allclose(emb[fv >= 0], np.asarray(vis).reshape(-1, 32)[fv[fv >= 0]], atol=1e-6)
    np.testing.assert_allclose(emb[fa >= 0], np.asarray(aud).reshape(-1, 32)[fa[fa >= 0]], atol=1e-6)
    text_pos = (fv < 0) & (fa < 0)
    np.testing.assert_array_equal(emb[text_pos], text[text_pos])
    assert h.shape == (2, 16, 32) and h.dtype == jnp.float32


def test_absent_modality_and_text_only(model, config):
    b = tiny_batch(config, with_audio=False)
    check_batch(b, config)
    assert jax.eval_shape(lambda: model(b)).shape == (2, 16, 32)
    text_only = tiny_config(encoders={}, projectors={}, placeholder_ids={})
    m = build(MultimodalModel, text_only, 0)
    tb = {k: b[k] for k in ("input_ids", "labels", "positions", "segment_ids", "span_ids")}
    tb["input_ids"] = np.maximum(tb["input_ids"], 3)
    check_batch(tb, text_only)
    # the same LLM weights (seed 0) with and without encoders: a text-only batch gives the same hidden states
    m.llm = nnx.clone(model.llm)
    both = jit_call(lambda ms, b: (ms[0](b), ms[1](b)), nnx.List([m, model]), tb)
    assert both[0].shape == (2, 16, 32) and len(m.encoders) == 0
    np.testing.assert_allclose(both[0], both[1], atol=1e-6)


def test_chunked_loss_equals_full_cross_entropy(model, batch):
    logits, losses = jit_call(lambda m, b: (m.llm.logits(m(b)), {c: m.loss(b, chunk=c) for c in (4, 16)}), model,
                              batch)
    logits = np.asarray(logits, np.float64)
    labels = batch["labels"]
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    valid = labels != -100
    tgt = np.take_along_axis(logits, np.maximum(labels, 0)[..., None], -1)[..., 0]
    want = ((lse - tgt) * valid).sum()
    for chunk in (4, 16):
        total, count = losses[chunk]
        assert int(count) == valid.sum()
        np.testing.assert_allclose(float(total), want, rtol=1e-5)


def test_loss_never_materialises_full_logits(model, batch):
    jaxpr = jax.make_jaxpr(lambda b: model.loss(b, chunk=4))(batch)
    shapes = set()

    def walk(j):
        for eqn in j.eqns:
            for v in eqn.outvars:
                shapes.add(tuple(getattr(v.aval, "shape", ())))
            for p in eqn.params.values():
                if hasattr(p, "eqns"):
                    walk(p)
                elif hasattr(getattr(p, "jaxpr", None), "eqns"):
                    walk(p.jaxpr)

    walk(jaxpr.jaxpr)
    assert (2, 4, 64) in shapes and (2, 16, 64) not in shapes


def test_lora_identity_then_one_step_changes_only_trainable(model, batch):
    """LoRA starts as the identity; after one optimizer step frozen parameters are exactly unchanged."""
    cfg = tiny_config(trainable={"encoders/audio": False, "projectors/audio": False, "llm": False})
    cfg = cfg.replace(lora=LoRAConfig(rank=2, alpha=4.0, targets=("q", "v", "o", "down", "fc1"),
                                      modules=("llm", "vision")))
    lora_model = build(MultimodalModel, cfg, 1)
    plain = nnx.clone(model)
    nnx.update(plain, nnx.state(lora_model, nnx.All(nnx.Param, nnx.Not(LoRAParam))))
    assert len(jax.tree.leaves(nnx.state(lora_model, LoRAParam))) == 2 * (4 + 5)  # llm q v o down; vision q v o fc1 fc2
    both = lambda ms, b: (ms[0](b), ms[1](b))  # noqa: E731
    with_lora, without = jit_call(both, nnx.List([lora_model, plain]), batch)
    np.testing.assert_allclose(with_lora, without, atol=1e-6)
    model = lora_model
    wrt = trainable_filter(cfg)
    opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=wrt)
    before = nnx.to_flat_state(nnx.state(model, nnx.Param))
    before = {p: np.array(v[...]) for p, v in before}
    trainable_paths = {p for p, v in nnx.to_flat_state(nnx.state(model, wrt))}
    opt_arrays = [x for x in jax.tree.leaves(nnx.state(opt, nnx.optimizer.OptState)) if np.ndim(x) > 0]
    assert len(opt_arrays) == 2 * len(trainable_paths)  # adam mu and nu for trainable parameters only
    assert sum(x.size for x in opt_arrays) == 2 * sum(before[p].size for p in trainable_paths)

    def step(model_opt, b):
        model, opt = model_opt

        def loss_fn(m):
            s, c = m.loss(b)
            return s / c

        grads = nnx.grad(loss_fn, argnums=nnx.DiffState(0, wrt))(model)
        opt.update(model, grads)
        return nnx.state(model_opt)

    model_opt = nnx.List([model, opt])
    nnx.update(model_opt, jit_call(step, model_opt, jax.tree.map(jnp.asarray, batch)))
    after = {p: np.array(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    changed = {p for p in before if not np.array_equal(before[p], after[p])}
    assert changed <= trainable_paths  # frozen parameters are exactly unchanged
    assert ("llm", "layers", "attn", "q", "lora_b") in changed and ("projectors", "vision", "mlp", "fc1", "kernel") \
        in changed
    assert ("llm", "layers", "attn", "q", "kernel") not in trainable_paths  # base weight under LoRA
    assert ("encoders", "vision", "layers", "attn", "q", "lora_b") in changed
    assert not any(p[:2] in (("encoders", "audio"), ("projectors", "audio")) for p in trainable_paths)
    assert not any(p[:2] == ("encoders", "vision") and "lora" not in p[-1] for p in trainable_paths)


def _count(jaxpr, name):
    n = 0
    for eqn in jaxpr.eqns:
        n += eqn.primitive.name == name
        for p in eqn.params.values():
            if hasattr(p, "eqns"):
                n += _count(p, name)
            elif hasattr(getattr(p, "jaxpr", None), "eqns"):
                n += _count(p.jaxpr, name)
    return n


def test_frozen_encoder_has_no_backward(model, batch):
    """A frozen encoder runs under stop_gradient: the gradient program has none of its backward matmuls."""
    counts = {}
    for frozen in (True, False):
        m = nnx.clone(model)
        m.config = tiny_config(trainable={"encoders/vision": not frozen, "encoders/audio": not frozen})
        graphdef, state = nnx.split(m)
        grad = jax.make_jaxpr(jax.grad(lambda st: nnx.merge(graphdef, st).loss(batch)[0]))(state)
        counts[frozen] = _count(grad.jaxpr, "dot_general")
    forward = _count(jax.make_jaxpr(lambda: model.loss(batch)[0])().jaxpr, "dot_general")
    # every encoder matmul needs at least one backward matmul (dW or dX) when trained, none when frozen
    enc_fwd = sum(_count(jax.make_jaxpr(lambda x, n=n: model.encoders[n](x))(batch["encoder_inputs"][n]).jaxpr,
                         "dot_general") for n in ("vision", "audio"))
    assert enc_fwd > 0
    assert counts[False] - counts[True] >= enc_fwd
    assert counts[True] > forward


def test_count_mismatch_names_the_sample(config, batch):
    b = {**batch, "feature_index": dict(batch["feature_index"])}
    fi = b["feature_index"]["vision"].copy()
    fi[1, 3] = -1
    b["feature_index"]["vision"] = fi
    with pytest.raises(ValueError, match=r"sample 1: 4 'vision' placeholder tokens but 3 'vision' features"):
        check_batch(b, config)


def test_bad_inputs_refused(model, config, batch):
    with pytest.raises(ValueError, match="do not fit the patch grid"):
        model.encoders["vision"](jnp.zeros((1, 9, 9, 3)))
    with pytest.raises(ValueError, match="image_size 8"):
        model.encoders["vision"](jnp.zeros((1, 12, 12, 3)))
    with pytest.raises(ValueError, match="n_mels=8"):
        model.encoders["audio"](jnp.zeros((1, 8, 80)))
    with pytest.raises(ValueError, match="= 8 frames; got 10"):
        model.encoders["audio"](jnp.zeros((1, 10, 8)))
    bad = dict(batch, input_ids=np.where(batch["input_ids"] == 5, 64, batch["input_ids"]))
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        check_batch(bad, config)
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        model(bad)
    with pytest.raises(ValueError, match="span_ids"):
        model(dict(batch, span_ids=batch["span_ids"][:, :8]))
    with pytest.raises(ValueError, match="span_ids shape"):
        check_batch(dict(batch, span_ids=batch["span_ids"][:, :8]), config)
    mel = dict(batch["encoder_inputs"], audio=np.zeros((2, 8, 80), np.float32))
    with pytest.raises(ValueError, match="n_mels=8"):
        check_batch(dict(batch, encoder_inputs=mel), config)
    with pytest.raises(ValueError, match="same modalities"):
        MultimodalModel(tiny_config(projectors={"vision": ProjectorConfig()}), rngs=nnx.Rngs(0))


def test_siglip_and_vit_towers():
    from mllm_jax.vision import VisionEncoder

    sig = dataclasses.replace(TINY_VISION, kind="siglip", class_token=False, pre_norm=False, post_norm=True,
                              activation="gelu_tanh", select_layer=-1)
    enc = build(VisionEncoder, sig)
    x = np.random.default_rng(0).normal(size=(3, 8, 8, 3)).astype(np.float32)
    y = x.copy()
    y[0] += 1.0
    out, out_y = (np.asarray(o) for o in jit_call(lambda e, x, y: (e(x), e(y)), enc, x, y))
    assert out.shape == (3, 4, 16) and "class_embedding" not in nnx.state(enc)
    np.testing.assert_allclose(out.mean(-1), 0.0, atol=1e-5)  # post LayerNorm (scale 1, bias 0) applied
    vit = dataclasses.replace(TINY_VISION, kind="vit", activation="gelu", drop_class_token=False)
    abstract = nnx.eval_shape(lambda: VisionEncoder(vit, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    assert jax.eval_shape(lambda st: nnx.merge(graphdef, st)(x), state).shape == (3, 5, 16)
    assert "bias" in state["patch_embed"]
    # each image is encoded on its own: changing image 0 leaves image 1's features unchanged
    a, b = out, out_y
    np.testing.assert_allclose(a[1:], b[1:], atol=1e-6)
    assert np.abs(a[0] - b[0]).max() > 1e-3
