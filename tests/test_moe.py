"""The MoE block on one device against its oracles:

- the sorted, grouped-matmul dispatch (``tiled``, ``ragged_dot``) equals the dense one-hot einsum (every expert on
  every token, weighted by the combine matrix), forward and gradients, for softmax / sigmoid gates, renormalised or
  not, with a shared expert and its gate, and in the capacity-dropping mode (the oracle then zeroes exactly the
  assignments past each expert's capacity, counted in token order);
- a router that sends every token to the same experts runs (finite loss and gradients) and its imbalance metric is
  E / k (closed form), with and without a capacity factor;
- the train step reports moe_aux_loss / moe_z_loss / imbalance of the batch and trains the router with the
  coefficients; ``mlp_sublayer`` (the signature the cached decode calls) equals ``mlp_sublayer_with_aux``'s hidden.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mllm_jax import moe
from mllm_jax.config import LLMConfig, RunSettings
from mllm_jax.llm import LLM, mlp_sublayer, mlp_sublayer_with_aux, use_layer_params


BASE = LLMConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=24, n_experts=6,
                 experts_per_token=2, moe_d_ff=12)


def _params(cfg, seed=0):
    """One MoE layer's parameters (gathered, float32) from a 1-layer LLM, router made decisive."""
    llm = LLM(cfg, rngs=nnx.Rngs(seed))
    values, names = llm.layer_params()
    p = jax.tree.map(lambda a: a[0], use_layer_params(values, names, RunSettings()))
    p = p["moe"]
    p["router"]["kernel"] = p["router"]["kernel"] * 40.0  # well-separated gates: no near-ties in the top-k
    return p


def _keep(p, x_TD, cfg) -> np.ndarray:
    """[T, k] which assignments the capacity keeps: each expert's first ``cap`` in token order (eager numpy; the
    routing is piecewise constant, so the gradients treat it as fixed either way)."""
    _, _, _, ids = moe.route(p["router"]["kernel"], x_TD, cfg)
    t, k = ids.shape
    flat = np.asarray(ids).reshape(-1)
    keep = np.ones(flat.shape, bool)
    cap = moe.capacity(t * k, cfg.n_experts, cfg.moe_capacity_factor)
    if cap is not None:
        seen = np.zeros(cfg.n_experts, int)
        for a, e in enumerate(flat):  # assignment a = token a // k, choice a % k: first come first served
            keep[a] = seen[e] < cap
            seen[e] += 1
    return keep.reshape(t, k)


def _oracle(p, x_TD, cfg, keep):
    """Dense one-hot einsum with the same routing (and the same capacity drop)."""
    _, _, gates, ids = moe.route(p["router"]["kernel"], x_TD, cfg)
    t = ids.shape[0]
    w = jnp.where(jnp.asarray(keep), gates, 0.0)
    comb = jnp.zeros((t, cfg.n_experts)).at[jnp.arange(t)[:, None], ids].add(w)
    y = moe.dense_moe(x_TD, comb, p["experts"], cfg.activation)
    if "shared" in p:
        from mllm_jax import layers as L

        sh = L.gated_mlp(p["shared"], x_TD[None], cfg.activation)[0]
        if "shared_gate" in p:
            sh = sh * jax.nn.sigmoid(x_TD @ p["shared_gate"]["kernel"])
        y = y + sh
    return y


CASES = {
    "softmax_renormalised": {},
    "softmax_raw_shared_gated": dict(norm_topk_prob=False, shared_expert_d_ff=8, shared_expert_gate=True),
    "sigmoid": dict(router_activation="sigmoid", norm_topk_prob=False),
    "capacity_1.0": dict(moe_capacity_factor=1.0),
}


@pytest.mark.parametrize("impl", ["tiled", "ragged_dot"])
@pytest.mark.parametrize("case", list(CASES))
def test_grouped_dispatch_equals_dense_oracle(case, impl):
    cfg = dataclasses.replace(BASE, moe_impl=impl, **CASES[case])
    p = _params(cfg)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 24, 16)).astype(np.float32))
    w_out = jnp.asarray(np.random.default_rng(1).normal(size=(2, 24, 16)).astype(np.float32))

    def ours(p, x):
        return jnp.sum(moe.moe_mlp(p, x, cfg)[0] * w_out)

    keep = _keep(p, x.reshape(-1, 16), cfg)

    def oracle(p, x):
        return jnp.sum(_oracle(p, x.reshape(-1, 16), cfg, keep).reshape(x.shape) * w_out)

    (v1, g1), (v2, g2) = (jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(p, x) for f in (ours, oracle))
    np.testing.assert_allclose(float(v1), float(v2), rtol=1e-5)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(g1)[0], jax.tree.leaves(g2)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5,
                                   err_msg=jax.tree_util.keystr(path))
    if cfg.moe_capacity_factor is not None:
        assert 0 < (~keep).sum()  # the capacity really dropped some assignments (else the case tests nothing)


def _collapsed(cfg):
    """A router whose logits favour experts 0 and 1 for every token (bias through a constant input feature)."""
    p = _params(cfg)
    k = np.zeros((16, cfg.n_experts), np.float32)
    k[:, 0], k[:, 1] = 50.0, 45.0
    p["router"]["kernel"] = jnp.asarray(k)
    return p


@pytest.mark.parametrize("capacity", [None, 1.0])
def test_router_sending_everything_to_one_expert_runs_and_shows_in_imbalance(capacity):
    cfg = dataclasses.replace(BASE, moe_capacity_factor=capacity, router_aux_loss_coef=0.1, router_z_loss_coef=0.01)
    p = _collapsed(cfg)
    x = jnp.abs(jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 16)).astype(np.float32))) + 0.1

    def loss(p):
        y, stats = moe.moe_mlp(p, x, cfg)
        return jnp.mean(y ** 2) + moe.layer_penalty(stats, cfg), stats

    (v, stats), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(p)
    assert np.isfinite(float(v)) and all(np.isfinite(np.asarray(a)).all() for a in jax.tree.leaves(g))
    counts = np.asarray(stats.counts)
    np.testing.assert_array_equal(counts, [16, 16, 0, 0, 0, 0])
    assert float(moe.load_imbalance(stats)) == pytest.approx(cfg.n_experts / cfg.experts_per_token)
    # load balancing loss at its maximum for this routing: E * (1 * p0 + 1 * p1), p0 + p1 ~ 1
    assert float(moe.load_balancing_loss(stats, 2)) == pytest.approx(cfg.n_experts, rel=1e-3)


def test_mlp_sublayer_keeps_its_signature_on_moe_layers():
    cfg = dataclasses.replace(BASE, shared_expert_d_ff=8)
    llm = LLM(cfg, rngs=nnx.Rngs(0))
    values, names = llm.layer_params()
    p = jax.tree.map(lambda a: a[0], use_layer_params(values, names, RunSettings()))
    h = jnp.asarray(np.random.default_rng(2).normal(size=(1, 5, 16)).astype(np.float32))
    h1 = mlp_sublayer(p, h, cfg, RunSettings())
    h2, stats = mlp_sublayer_with_aux(p, h, cfg, RunSettings())
    np.testing.assert_array_equal(np.asarray(h1), np.asarray(h2))
    assert float(stats.tokens) == 5 and float(jnp.sum(stats.counts)) == 10


def test_train_step_reports_and_trains_the_router_losses():
    from model_testlib import build, tiny_batch, tiny_config
    from mllm_jax import MultimodalModel
    from mllm_jax.freeze import trainable_filter
    from mllm_jax.train.metrics import moe_fields
    from mllm_jax.train.step import make_train_step

    llm = dataclasses.replace(BASE, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, vocab_size=64,
                              moe_layer_freq=2, router_aux_loss_coef=0.5, router_z_loss_coef=0.1)
    cfg = tiny_config(llm=llm)
    model = build(MultimodalModel, cfg, 0)
    batch = jax.tree.map(jnp.asarray, tiny_batch(cfg))
    _, _, stats = jax.jit(lambda m, b: m.loss_terms(b))(model, batch)
    aux, z = moe.objective_terms(stats, llm)
    import optax

    def step_grads(coef):
        m = build(MultimodalModel, cfg.replace(llm=dataclasses.replace(llm, router_aux_loss_coef=coef)), 0)
        opt = nnx.Optimizer(m, optax.sgd(1.0), wrt=trainable_filter(m.config))
        graphdef, state = nnx.split((m, opt))
        step = make_train_step(graphdef, trainable_filter(m.config))
        new_state, metrics = jax.jit(step)(state, jax.tree.map(lambda a: a[None], batch))
        before = nnx.to_pure_dict(nnx.state(m))["llm"]["layers"]["moe"]["router"]["kernel"]
        after = nnx.to_pure_dict(new_state)[0]["llm"]["layers"]["moe"]["router"]["kernel"]
        return metrics, np.asarray(before) - np.asarray(after)

    metrics, d_with = step_grads(0.5)
    row = moe_fields(jax.device_get(metrics), llm.moe_layers)
    assert set(row) == {"moe_aux_loss", "moe_z_loss", "moe_imbalance_max", "moe_imbalance/layer_1"}
    assert row["moe_aux_loss"] == pytest.approx(float(aux), rel=1e-5)
    assert row["moe_z_loss"] == pytest.approx(float(z), rel=1e-5)
    assert row["moe_imbalance/layer_1"] == pytest.approx(float(moe.load_imbalance(stats)[0]), rel=1e-5)
    metrics0, d_without = step_grads(0.0)
    assert float(metrics0["loss"]) == pytest.approx(float(metrics["loss"]), rel=1e-6)  # the loss is the CE alone
    assert np.abs(d_with - d_without).max() > 1e-6  # the aux coefficient moves the router


def test_cost_model_counts_total_params_and_active_flops():
    """The planners' layer costs: parameters of every expert (memory) = the model's own count; FLOPs of the
    active experts only (a closed form: the same layer with n_experts = experts_per_token costs the same FLOPs
    minus the router's columns)."""
    from mllm_jax import costs

    cfg = dataclasses.replace(BASE, n_layers=3, moe_first_dense_layers=1, shared_expert_d_ff=8,
                              shared_expert_gate=True, qk_norm=True)
    llm = LLM(cfg, rngs=nnx.Rngs(0))
    values, _ = llm.layer_params()
    actual = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(values))
    layers = [costs.llm_layer(cfg, 32, index=i) for i in range(cfg.n_layers)]
    assert sum(layer.params for layer in layers) == actual
    few = dataclasses.replace(cfg, n_experts=cfg.experts_per_token)
    moe_flops = costs.llm_layer(cfg, 32, index=1).weight_flops
    assert moe_flops - costs.llm_layer(few, 32, index=1).weight_flops == 32 * 2 * 16 * (6 - 2)  # router columns
    assert layers[1].params > layers[0].params  # total (6 experts) vs the dense layer


@pytest.mark.parametrize("impl,target", [("megablox", "tpu:v5e:1x1"), ("ragged_dot", "tpu:v5e:1x1"),
                                         ("ragged_dot", "gpu:h100:1x1")])
def test_grouped_matmuls_compile_for_accelerators(impl, target):
    """The TPU / GPU dispatch (the Pallas megablox gmm, jax.lax.ragged_dot) forward + backward compiled by the
    target's own compiler (libtpu's XLA:TPU + Mosaic, the deviceless CUDA back end): no accelerator here to run them,
    so the oracle is the compiler accepting the program (megablox: a Mosaic custom call in it)."""
    from kernel_testlib import compile_on_one_device

    cfg = dataclasses.replace(BASE, d_model=256, n_experts=8, moe_d_ff=256, moe_impl=impl)
    e, d, f = 8, 256, 256
    spec = lambda *s: jax.ShapeDtypeStruct(s, jnp.bfloat16)  # noqa: E731
    p = {"router": {"kernel": spec(d, e)}, "experts": {"gate": {"kernel": spec(e, d, f)},
                                                       "up": {"kernel": spec(e, d, f)},
                                                       "down": {"kernel": spec(e, f, d)}}}
    grad = jax.grad(lambda p, x: jnp.sum(moe.moe_mlp(p, x, cfg)[0].astype(jnp.float32)))
    _, hlo = compile_on_one_device(target, grad, p, spec(1, 512, d))
    if impl == "megablox":
        assert "tpu_custom_call" in hlo
