"""Stacked layers: compile size independent of depth; remat policies change memory, not results."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mllm_jax.kernels.meta import TokenMeta
from mllm_jax.config import RunSettings
from mllm_jax.llm import LLM

from model_testlib import TINY_LLM, build


def _jaxpr_size(n_layers: int) -> int:
    cfg = dataclasses.replace(TINY_LLM, n_layers=n_layers)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: LLM(cfg, rngs=nnx.Rngs(0))))
    meta = TokenMeta.causal(1, 8, xp=jnp)
    ids = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    jaxpr = jax.make_jaxpr(lambda st, i: nnx.merge(graphdef, st)(i, meta))(state, ids)
    return len(str(jaxpr))


def test_jaxpr_of_16_layers_is_not_bigger_than_2_layers():
    small, big = _jaxpr_size(2), _jaxpr_size(16)
    assert big <= 1.2 * small, (small, big)


def _primitives(jaxpr) -> set:
    names = set()
    for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        for p in eqn.params.values():
            for sub in p if isinstance(p, (tuple, list)) else (p,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    names |= _primitives(inner)
    return names


def test_remat_policies_give_identical_loss_and_grads():
    """The same weights under each remat policy: loss and gradients equal the plain scan's."""
    ids = np.random.default_rng(0).integers(0, 64, (1, 8)).astype(np.int32)
    meta = TokenMeta.causal(1, 8, xp=jnp)
    ref = build(LLM, TINY_LLM)
    results = {}
    for remat in ("none", "full", "dots"):
        m = nnx.clone(ref)
        m.run = RunSettings(remat=remat)  # a static setting: same parameters, another program
        graphdef, params = nnx.split(m)
        loss = lambda p: jnp.mean(nnx.merge(graphdef, p)(ids, meta) ** 2)  # noqa: E731
        prims = _primitives(jax.make_jaxpr(loss)(params).jaxpr)
        assert bool(prims & {"checkpoint", "remat", "remat2"}) == (remat != "none")  # the layer body is remat'd
        results[remat] = jax.jit(jax.value_and_grad(loss))(params)
    l0, g0 = results["none"]
    for remat in ("full", "dots"):
        l1, g1 = results[remat]
        np.testing.assert_allclose(l1, l0, rtol=1e-6)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g1, g0)


def test_unrolled_layer_loop_gives_the_scans_loss_and_grads():
    """ModelConfig.layer_loop="unrolled" (a Python loop over the stacked layers of the LLM, the vision and the audio
    encoder) is the same function as the lax.scan: the same weights give the scan's loss and gradients."""
    from mllm_jax import MultimodalModel

    from model_testlib import tiny_batch, tiny_config

    config = tiny_config()
    batch = tiny_batch(config)
    results = {}
    for loop in ("scan", "unrolled"):
        model = build(MultimodalModel, dataclasses.replace(config, layer_loop=loop), 0)
        graphdef, params = nnx.split(model)
        loss = lambda p: model_loss(nnx.merge(graphdef, p), batch)  # noqa: E731
        prims = _primitives(jax.make_jaxpr(loss)(params).jaxpr)
        assert ("scan" in prims) == (loop == "scan"), prims
        results[loop] = jax.jit(jax.value_and_grad(loss))(params)
    (l0, g0), (l1, g1) = results["scan"], results["unrolled"]
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g1, g0)


def model_loss(model, batch):
    total, count = model.loss(batch)
    return total / count


def test_unknown_layer_loop_is_refused():
    from mllm_jax import MultimodalModel

    from model_testlib import tiny_config

    with pytest.raises(ValueError, match="layer_loop must be one of .*'while'"):
        MultimodalModel(dataclasses.replace(tiny_config(), layer_loop="while"), rngs=nnx.Rngs(0))
