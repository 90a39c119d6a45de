"""Context-parallel attention (kernels/context_parallel.py) on 8 fake devices: forward and gradients on permuted,
context-sharded sequences equal kernels.attention on one device on the original order."""

from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from benchmarks.cp_balance import family_meta
from kernels import TokenMeta, attention
from kernels.context_parallel import context_attention
from parallel.context import plan, unpermute

AXES = ("data", "context", "tensor")


def _mesh(data, context, tensor):
    return jax.make_mesh((data, context, tensor), AXES, axis_types=(AxisType.Explicit,) * 3)


def _meta(families, length, seed):
    metas = [family_meta(f, length, np.random.default_rng([seed, i])) for i, f in enumerate(families)]
    return TokenMeta(*(np.concatenate([getattr(m, f) for m in metas]) for f in TokenMeta._fields))


def _take(x, perm):
    """Permute [B, S, ...] along the sequence; -1 slots become zeros (padding)."""
    idx = jnp.asarray(np.maximum(perm, 0))[:, :, None, None]
    return jnp.where(jnp.asarray(perm >= 0)[:, :, None, None], jnp.take_along_axis(x, idx, axis=1), 0)


# (mesh, mode, method, families, extra attention kwargs): cp = 8, 4 and 2, with data and tensor axes beside context.
CASES = [
    ((1, 8, 1), "balanced", "allgather", ("multimodal_packed",), {}),
    ((1, 8, 1), "zigzag", "ring", ("interleaved_multi_image",), {}),
    ((1, 4, 2), "lpt", "allgather", ("video", "prefix_lm_document"), {"softcap": 3.0}),
    ((1, 4, 2), "balanced", "ring", ("audio_image", "encoder_embedded"), {"softcap": 3.0, "window": 40}),
    ((2, 2, 2), "balanced", "allgather", ("llava_single_image", "causal_blockwise"), {}),
    ((2, 2, 2), "uniform", "ring", ("multimodal_packed", "prefix_lm_causal"), {}),
]


@pytest.mark.slow
@pytest.mark.parametrize("shape, mode, method, families, kw", CASES)
def test_forward_and_gradients_match_one_device(shape, mode, method, families, kw):
    b, s, hq, hkv, d = len(families), 250, 4, 2, 8
    meta = _meta(families, s, seed=sum(shape))
    keys = jax.random.split(jax.random.key(len(families) + shape[1]), 4)
    q = jax.random.normal(keys[0], (b, s, hq, d))
    k = jax.random.normal(keys[1], (b, s, hkv, d))
    v = jax.random.normal(keys[2], (b, s, hkv, d))
    w = jax.random.normal(keys[3], (b, s, hq, d))
    m1 = TokenMeta(*map(jnp.asarray, meta))

    def ref_loss(q, k, v):
        out = attention(q, k, v, m1, m1, impl="dense", **kw)
        return jnp.sum(out * w), out

    (_, ref_out), ref_grads = jax.value_and_grad(ref_loss, (0, 1, 2), has_aux=True)(q, k, v)

    p = plan(meta, shape[1], mode, block=32, tile_k=8)  # small blocks: many blocks per rank at S = 250
    mesh = _mesh(*shape)
    spec, mspec = P("data", "context", "tensor", None), P("data", "context")
    with jax.set_mesh(mesh):
        qp, kp, vp, wp = (jax.device_put(_take(x, p.permutation), NamedSharding(mesh, spec)) for x in (q, k, v, w))
        mp = TokenMeta(*(jax.device_put(jnp.asarray(a), NamedSharding(mesh, mspec)) for a in p.permute_meta(meta)))

        @jax.jit
        def cp_loss_and_grads(q, k, v, meta):
            def loss(q, k, v):
                out = context_attention(q, k, v, meta, meta, mesh=mesh, method=method, impl="dense", **kw)
                return jnp.sum(out * wp), out

            return jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(q, k, v)

        (_, out), grads = cp_loss_and_grads(qp, kp, vp, mp)
        assert jax.typeof(out).sharding.spec[1] == "context"
    np.testing.assert_allclose(unpermute(np.asarray(out), p), ref_out, atol=2e-5, rtol=2e-5)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(unpermute(np.asarray(g), p), r, atol=5e-5, rtol=5e-5)
    # Padding slots (segment 0) produce zeros and get zero gradients.
    pad = p.permutation < 0
    assert not np.asarray(out)[pad].any() and not np.asarray(grads[0])[pad].any()


def _primitives(jaxpr, counts):
    for eqn in jaxpr.eqns:
        counts[eqn.primitive.name] += 1
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    _primitives(inner, counts)
    return counts


def test_allgather_backward_is_psum_scatter_per_kv_group():
    mesh = jax.make_mesh((8,), ("context",), axis_types=(AxisType.Explicit,))
    meta = TokenMeta.causal(1, 64, xp=jnp)
    q, k = jnp.ones((1, 64, 4, 8)), jnp.ones((1, 64, 2, 8))
    fwd = lambda q, k, v: context_attention(q, k, v, meta, meta, mesh=mesh).sum()  # noqa: E731
    with jax.set_mesh(mesh):
        f = _primitives(jax.make_jaxpr(fwd)(q, k, k).jaxpr, Counter())
        g = _primitives(jax.make_jaxpr(jax.grad(fwd, (0, 1, 2)))(q, k, k).jaxpr, Counter())
    # Forward: 3 metadata gathers + (k, v) per KV head (2 groups). Backward: re-gather (remat) + psum_scatter of dK/dV.
    assert f["all_gather"] == 3 + 2 * 2 and f["reduce_scatter"] == 0
    assert g["reduce_scatter"] == 2 * 2 and g["all_gather"] == f["all_gather"] + 2 * 2
    assert g["psum"] == 0  # no all-reduce of full-length K/V gradients


def test_ring_moves_kv_by_ppermute_only():
    mesh = jax.make_mesh((4,), ("context",), axis_types=(AxisType.Explicit,))
    meta = TokenMeta.causal(1, 64, xp=jnp)
    q, k = jnp.ones((1, 64, 4, 8)), jnp.ones((1, 64, 2, 8))
    fwd = lambda q, k, v: context_attention(q, k, v, meta, meta, mesh=mesh, method="ring").sum()  # noqa: E731
    with jax.set_mesh(mesh):
        g = _primitives(jax.make_jaxpr(jax.grad(fwd, (0, 1, 2)))(q, k, k).jaxpr, Counter())
    assert g["ppermute"] > 0 and g["all_gather"] == 0 and g["reduce_scatter"] == 0


def test_bad_inputs_are_refused():
    mesh = jax.make_mesh((4, 2), ("context", "tensor"), axis_types=(AxisType.Explicit,) * 2)
    meta = TokenMeta.causal(1, 64, xp=jnp)
    q, k = jnp.ones((1, 64, 4, 8)), jnp.ones((1, 64, 2, 8))
    with pytest.raises(ValueError, match="k_meta"):
        context_attention(q, k, k, meta, TokenMeta.causal(1, 32, xp=jnp), mesh=mesh)
    with pytest.raises(ValueError, match="not divisible by the 'context' axis size 4"):
        m = TokenMeta.causal(1, 62, xp=jnp)
        context_attention(q[:, :62], k[:, :62], k[:, :62], m, m, mesh=mesh)
    with pytest.raises(ValueError, match="method"):
        context_attention(q, k, k, meta, meta, mesh=mesh, method="striped")
    with pytest.raises(ValueError, match="not a mesh axis"):
        context_attention(q, k, k, meta, meta, mesh=mesh, axis="sequence")
    with pytest.raises(ValueError, match="head axes"):
        context_attention(q, k[:, :, :1], k[:, :, :1], meta, meta, mesh=mesh, head_axes="tensor")
