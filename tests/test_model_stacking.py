"""Stacked layers: compile size independent of depth; remat policies change memory, not results."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kernels.meta import TokenMeta
from mllm_jax.llm import LLM, RunSettings

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


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_policies_give_identical_loss_and_grads(remat):
    ids = np.random.default_rng(0).integers(0, 64, (1, 8)).astype(np.int32)
    meta = TokenMeta.causal(1, 8, xp=jnp)
    ref = build(LLM, TINY_LLM)
    other = build(LLM, TINY_LLM, run=RunSettings(remat=remat))

    @nnx.jit
    def loss_and_grad(m, i):
        return nnx.value_and_grad(lambda m: jnp.mean(m(i, meta) ** 2))(m)

    l0, g0 = loss_and_grad(ref, ids)
    l1, g1 = loss_and_grad(other, ids)
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g1, g0)
