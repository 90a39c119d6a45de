"""Ring context-parallel attention inside pipeline stages (kernels.context_parallel._hop: inside a stage the ring's
hop is an all_to_all over the stage's context group, not a ppermute over every device).

Oracles: a pipeline of attention layers on pipeline=2 x context=2 with the ring gives the sequential one-device loss
and gradients (parallel.pipeline.sequential_value_and_grad, dense attention); the pipelined multimodal model with
ContextConfig.attention="ring" gives one device's (test_pipeline_llm.check); the pipelined program compiles for a TPU
topology with the Mosaic kernels and the ring's all-to-all in it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from mllm_jax import kernels
from mllm_jax.kernels import TokenMeta
from mllm_jax.parallel.config import ContextConfig, ParallelConfig
from mllm_jax.parallel.pipeline import pipeline_value_and_grad, sequential_value_and_grad
from test_compile_target import needs_tpu
from test_pipeline_llm import FROZEN_ENC, check, tiny_config

M, MB, S, D, H, HD = 2, 2, 32, 16, 2, 8  # microbatches, rows, tokens, width, heads, head dim


def _layer(impl, interpret=False):
    def layer_fn(p, x, aux_m):
        meta = TokenMeta(aux_m["pos"], aux_m["seg"], aux_m["span"])
        q, k, v = (jnp.einsum("bsd,dhe->bshe", x, p[n]) for n in ("wq", "wk", "wv"))
        o = kernels.attention(q, k, v, meta, meta, impl=impl, interpret=interpret, context_method="ring")
        return x + jnp.einsum("bshe,hed->bsd", o, p["wo"])

    return layer_fn


def _loss(lp, y, aux_m):
    return jnp.sum(jnp.tanh(y @ lp["v"]) * aux_m["w"])


def _problem(n_layers=2, hd=HD):
    k = jax.random.split(jax.random.key(3), 7)
    params = {n: jax.random.normal(k[i], (n_layers, D, H, hd)) * 0.3 for i, n in enumerate(("wq", "wk", "wv"))}
    params["wo"] = jax.random.normal(k[3], (n_layers, H, hd, D)) * 0.3
    lp = {"v": jax.random.normal(k[4], (D, 3))}
    x = jax.random.normal(k[5], (M, MB, S, D))
    # Two packed samples per row, an image span (bidirectional), padding at the end; differs per microbatch.
    seg = np.zeros((M, MB, S), np.int32)
    pos = np.zeros((M, MB, S), np.int32)
    span = np.zeros((M, MB, S), np.int32)
    for m in range(M):
        for b in range(MB):
            cut, used = 11 + 3 * m + b, S - 2 - b
            seg[m, b, :cut], seg[m, b, cut:used] = 1, 2
            pos[m, b, :cut], pos[m, b, cut:used] = np.arange(cut), np.arange(used - cut)
            span[m, b, 3 + m : 9 + m] = 1
    aux = {"pos": jnp.asarray(pos), "seg": jnp.asarray(seg), "span": jnp.asarray(span),
           "w": jax.random.normal(k[6], (M, MB, S, 3))}
    return params, lp, x, aux


def _mesh(devices):
    return jax.make_mesh((2, 2), ("pipeline", "context"), axis_types=(AxisType.Explicit,) * 2, devices=devices)


def _pipelined(layer_fn, mesh):
    def run(p, lp, x, aux):
        return pipeline_value_and_grad(layer_fn, p, x, loss_fn=_loss, loss_params=lp, aux=aux, stage_layers=(1, 1),
                                       mesh=mesh, input_requires_grad=True)

    return run


def _seq_sharded(mesh, tree):
    """[M, mb, S, ...] leaves with the sequence over `context`."""
    return jax.tree.map(lambda a: jax.device_put(a, NamedSharding(mesh, P(None, None, "context"))), tree)


@pytest.mark.slow
def test_ring_inside_pipeline_stages_matches_one_device():
    params, lp, x, aux = _problem()
    want_loss, (want_g, want_glp, want_dx) = jax.jit(lambda p, lp, x, aux: sequential_value_and_grad(
        _layer("dense"), p, x, loss_fn=_loss, loss_params=lp, aux=aux))(params, lp, x, aux)
    mesh = _mesh(jax.devices()[:4])
    run = _pipelined(_layer("xla"), mesh)
    with jax.set_mesh(mesh):
        x_c, aux_c = _seq_sharded(mesh, (x, aux))
        lowered = jax.jit(run).lower(params, lp, x_c, aux_c)
        loss, (g, glp, dx) = lowered.compile()(params, lp, x_c, aux_c)
    assert "all_to_all" in lowered.as_text()  # the ring's hop inside the stages (the pipeline's own are permutes)
    np.testing.assert_allclose(loss, want_loss, rtol=2e-5)
    # The ring's blockwise online softmax against the dense softmax: float32 round-off of sums whose terms are as
    # large as the array's largest entries, so the absolute tolerance scales with them (near-zero entries of a
    # gradient reaching 30 differ by up to ~2e-6 of its scale, depending on the host's vector units).
    got_want = [(name, g[name], want_g[name]) for name in params] + [("v", glp["v"], want_glp["v"]), ("dx", dx, want_dx)]
    for name, got, want in got_want:
        scale = np.abs(want).max()
        assert scale > 0, name
        np.testing.assert_allclose(got, want, rtol=5e-5, atol=1e-5 * scale, err_msg=name)


@needs_tpu
@pytest.mark.slow
def test_ring_inside_pipeline_stages_compiles_for_tpu_with_mosaic_kernels():
    """The same pipelined program (impl "auto": pallas_tpu on the target's mesh, head dim 128) compiled by libtpu for
    v5e:2x2 as pipeline=2 x context=2: the ring's forward, dQ and dK/dV Mosaic kernels and its all-to-all hops are
    in the compiled step (a Mosaic call outside a region manual over every axis would be refused)."""
    from mllm_jax.train import compile_target as ct
    from mllm_jax.train import targets

    mesh = _mesh(targets.parse("tpu:v5e:2x2").devices())
    abstract = lambda a, spec: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, spec))  # noqa
    params, lp, x, aux = _problem(hd=128)
    args = (jax.tree.map(lambda a: abstract(a, P()), (params, lp))
            + jax.tree.map(lambda a: abstract(a, P(None, None, "context")), (x, aux)))
    compiled, _, _ = ct.compile_on_target(jax.jit(_pipelined(_layer("auto"), mesh)), args, mesh,
                                          what="tpu:v5e:2x2 pipeline=2 x context=2 ring")
    text = compiled.as_text()
    kernels_in = ct.pallas_kernels(text)
    assert all(kernels_in.get(n, 0) >= 1 for n in ("mllm_flash_fwd", "mllm_flash_dq", "mllm_flash_dkv")), kernels_in
    assert ct.collectives(text)["all-to-all"]["count"] >= 2, ct.collectives(text)


def test_ring_hop_is_a_ppermute_outside_stages_and_an_all_to_all_inside():
    """Which collective moves K/V round the ring: ppermute on a mesh whose pipeline axis is not manual (even of size
    2: the ring's own shard_map makes it manual, which is not a stage), all_to_all inside a shard_map already manual
    over `pipeline` (a stage: kernels.context_parallel._hop)."""
    from mllm_jax.kernels.context_parallel import context_attention

    mesh = _mesh(jax.devices()[:4])
    meta = TokenMeta.causal(1, 64, xp=jnp)
    q, k = jnp.ones((1, 64, 2, 8)), jnp.ones((1, 64, 1, 8))

    def ring(q, k):
        return context_attention(q, k, k, meta, meta, mesh=jax.sharding.get_abstract_mesh(), method="ring").sum()

    in_stage = jax.shard_map(lambda q, k: ring(q, k)[None], mesh=mesh, in_specs=(P(), P()), out_specs=P("pipeline"),
                             axis_names={"pipeline"}, check_vma=False)
    with jax.set_mesh(mesh):
        outside = str(jax.make_jaxpr(jax.grad(ring, (0, 1)))(q, k))
        inside = str(jax.make_jaxpr(jax.grad(lambda q, k: in_stage(q, k).sum(), (0, 1)))(q, k))
    assert "ppermute" in outside and "all_to_all" not in outside
    assert "all_to_all" in inside and "ppermute" not in inside
