"""layers.project: every projection einsum runs as one 2-d matmul on whole arrays, and as the einsum (laid out on the
mesh) on sharded ones; both equal jnp.einsum."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from mllm_jax import layers as L
from mllm_jax import partitioning as part

CASES = [  # (equation, x shape, w shape, output's logical names)
    ("bsd,dhk->bshk", (2, 6, 8), (8, 4, 3), ("batch", "length", "heads", "head_dim")),
    ("bshk,hkd->bsd", (2, 6, 4, 3), (4, 3, 8), ("batch", "length", "act_embed")),
    ("bsd,df->bsf", (2, 6, 8), (8, 5), ("batch", "length", "mlp")),
    ("ntc,cd->ntd", (3, 4, 8), (8, 5), ("batch", "length", "act_embed")),
    ("nhiwjc,ijcd->nhwd", (2, 2, 2, 2, 2, 3), (2, 2, 3, 5), ("batch", None, None, "act_embed")),  # not a matmul
]


def test_matmul_split_recognises_projections_only():
    assert L.matmul_split("bsd,dhk->bshk") == ("bs", "d", "hk")
    assert L.matmul_split("bshk,hkd->bsd") == ("bs", "hk", "d")
    assert L.matmul_split("bsd,dv->bsv") == ("bs", "d", "v")
    assert L.matmul_split("nhiwjc,ijcd->nhwd") is None  # contracted axes interleaved with kept ones
    assert L.matmul_split("bsd,df->bfs") is None  # output not lead + kept
    assert L.matmul_split("bhrd,bhkd->bhrk") is None  # a batched product (b, h on both sides)


@pytest.mark.parametrize("eq,xs,ws,names", CASES)
def test_project_equals_einsum_without_a_mesh(eq, xs, ws, names):
    rng = np.random.default_rng(0)
    x, w = rng.normal(size=xs).astype(np.float32), rng.normal(size=ws).astype(np.float32)
    want = np.einsum(eq, x.astype(np.float64), w.astype(np.float64))
    got = jax.jit(lambda x, w: L.project(eq, x, w, names))(x, w)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # and its gradients (the 2-d path's weight gradient is the einsum's)
    g = jax.grad(lambda x, w: jnp.sum(L.project(eq, x, w, names) ** 2), argnums=(0, 1))(x, w)
    g_ref = jax.grad(lambda x, w: jnp.sum(jnp.einsum(eq, x, w) ** 2), argnums=(0, 1))(x, w)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), g, g_ref)


def test_project_on_a_sharded_mesh_keeps_the_layout():
    """Over a data-sharded batch the einsum path runs (a reshape would merge a sharded axis): same values, and the
    output laid out as its logical names say."""
    mesh = jax.make_mesh((2,), ("data",), axis_types=(AxisType.Explicit,), devices=jax.devices()[:2])
    rng = np.random.default_rng(1)
    x, w = rng.normal(size=(4, 6, 8)).astype(np.float32), rng.normal(size=(8, 5)).astype(np.float32)
    rules = (("batch", "data"),)
    with jax.set_mesh(mesh), part.rules_scope(rules):
        xs = jax.device_put(x, NamedSharding(mesh, P("data")))
        assert not L._unsharded_mesh()
        y = jax.jit(lambda x, w: L.project("bsd,df->bsf", x, w, ("batch", "length", "mlp")))(xs, w)
    np.testing.assert_allclose(y, np.einsum("bsd,df->bsf", x, w), rtol=1e-5, atol=1e-5)
    assert y.sharding.spec[0] == "data"
