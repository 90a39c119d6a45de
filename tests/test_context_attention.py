"""Context-parallel attention (kernels/context_parallel.py) on 8 fake devices: forward and gradients on permuted,
context-sharded sequences equal kernels.attention on one device on the original order."""

import functools
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from benchmarks.cp_balance import family_meta
from mllm_jax.kernels import TokenMeta, attention
from mllm_jax.kernels.context_parallel import context_attention
from mllm_jax.parallel.context import plan, unpermute
from test_compile_target import needs_cuda

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


@functools.lru_cache(maxsize=None)
def _reference(kw_items):
    """jit(q, k, v, meta, w) -> ((sum(out * w), out), (dq, dk, dv)) of one-device dense attention; one per option set."""
    kw = dict(kw_items)

    def loss(q, k, v, meta, w):
        out = attention(q, k, v, meta, meta, impl="dense", **kw)
        return jnp.sum(out * w), out

    return jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))


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
    (_, ref_out), ref_grads = _reference(tuple(sorted(kw.items())))(q, k, v, TokenMeta(*map(jnp.asarray, meta)), w)

    p = plan(meta, shape[1], mode, block=32, tile_k=8)  # small blocks: several blocks per rank at S = 250
    mesh = _mesh(*shape)
    spec, mspec = P("data", "context", "tensor", None), P("data", "context")
    with jax.set_mesh(mesh):
        qp, kp, vp, wp = (jax.device_put(_take(x, p.permutation), NamedSharding(mesh, spec)) for x in (q, k, v, w))
        mp = TokenMeta(*(jax.device_put(jnp.asarray(a), NamedSharding(mesh, mspec)) for a in p.permute_meta(meta)))

        @jax.jit
        def cp_loss_and_grads(q, k, v, meta, w):
            def loss(q, k, v):
                out = context_attention(q, k, v, meta, meta, mesh=mesh, method=method, impl="dense", **kw)
                return jnp.sum(out * w), out

            return jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(q, k, v)

        (_, out), grads = cp_loss_and_grads(qp, kp, vp, mp, wp)
        assert jax.typeof(out).sharding.spec[1] == "context"
    np.testing.assert_allclose(unpermute(np.asarray(out), p), ref_out, atol=2e-5, rtol=2e-5)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(unpermute(np.asarray(g), p), r, atol=5e-5, rtol=5e-5)
    # Padding slots (segment 0) produce zeros and get zero gradients.
    pad = p.permutation < 0
    assert not np.asarray(out)[pad].any() and not np.asarray(grads[0])[pad].any()


@pytest.mark.slow
def test_ring_never_materialises_a_shard_by_shard_matrix():
    # Ring forward+backward at a long shard (2048 tokens per rank): the compiled per-device temporaries stay far below
    # one dense [B, H, S/cp, S/cp] f32 score matrix (a dense step needs several: logits, p, dp, ds). The same measure
    # on the dense all-gather path, which does materialise [S/cp, S] scores, is above it: the check can fail.
    cp, shard = 2, 2048
    mesh = jax.make_mesh((cp,), ("context",), axis_types=(AxisType.Explicit,), devices=jax.devices()[:cp])
    x = jax.ShapeDtypeStruct((1, cp * shard, 1, 16), jnp.float32, sharding=NamedSharding(mesh, P(None, "context")))
    m = jax.ShapeDtypeStruct((1, cp * shard), jnp.int32, sharding=NamedSharding(mesh, P(None, "context")))
    dense_scores = shard * shard * 4
    temp = {}
    for method, impl in (("ring", "xla"), ("allgather", "dense")):
        def loss(q, k, v, meta, method=method, impl=impl):
            return context_attention(q, k, v, meta, meta, mesh=mesh, method=method, impl=impl).sum()

        with jax.set_mesh(mesh):
            compiled = jax.jit(jax.grad(loss, (0, 1, 2))).lower(x, x, x, TokenMeta(m, m, m)).compile()
        temp[method] = compiled.memory_analysis().temp_size_in_bytes
    assert temp["ring"] < dense_scores / 4, (temp, dense_scores)
    assert temp["allgather"] > dense_scores, (temp, dense_scores)


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


def test_ring_steps_with_the_pallas_tpu_kernel():
    """Ring attention with impl="pallas_tpu" (TPU interpret mode): every ring step is the Pallas kernel's block
    forward / backward (its live-tile grid skips the empty tiles inside a step), merged by log-sum-exp; forward and
    gradients match one-device dense attention on a zigzag-permuted packed batch, and the steps are Pallas calls."""
    from mllm_jax.kernels import context_parallel

    assert context_parallel._ring_kernel("pallas_tpu", 128) == "pallas_tpu"
    assert context_parallel._ring_kernel("auto", 128) == "tiled"  # CPU
    calls = _ring_vs_dense("pallas_tpu", dict(block_q=128, block_k=128), {"softcap": 3.0}, seed=5)
    assert calls >= 3, calls  # the forward block, then dQ and dK/dV blocks, inside the ring's scan and cond


def _ring_vs_dense(impl, blocks, kw, *, seed):
    """Ring attention on a zigzag-permuted packed batch over context=2 with ``impl`` (interpret mode) against
    one-device dense attention, forward and gradients; returns the number of pallas_calls in the ring's jaxpr."""
    shape, families = (1, 2, 1), ("multimodal_packed", "llava_single_image")
    b, s, hq, hkv, d = len(families), 256, 4, 2, 16
    meta = _meta(families, s, seed=seed)
    keys = jax.random.split(jax.random.key(seed + 2), 4)
    q = jax.random.normal(keys[0], (b, s, hq, d))
    k = jax.random.normal(keys[1], (b, s, hkv, d))
    v = jax.random.normal(keys[2], (b, s, hkv, d))
    w = jax.random.normal(keys[3], (b, s, hq, d))
    (_, ref_out), ref_grads = _reference(tuple(sorted(kw.items())))(q, k, v, TokenMeta(*map(jnp.asarray, meta)), w)

    p = plan(meta, shape[1], "zigzag", block=32, tile_k=8)
    mesh = _mesh(*shape)
    spec, mspec = P("data", "context", "tensor", None), P("data", "context")
    with jax.set_mesh(mesh):
        qp, kp, vp, wp = (jax.device_put(_take(x, p.permutation), NamedSharding(mesh, spec)) for x in (q, k, v, w))
        mp = TokenMeta(*(jax.device_put(jnp.asarray(a), NamedSharding(mesh, mspec)) for a in p.permute_meta(meta)))

        def loss(q, k, v, meta, w):
            out = context_attention(q, k, v, meta, meta, mesh=mesh, method="ring", impl=impl, interpret=True,
                                    **blocks, **kw)
            return jnp.sum(out * w), out

        grad_fn = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)
        calls = str(jax.make_jaxpr(grad_fn)(qp, kp, vp, mp, wp)).count("pallas_call")
        (_, out), grads = jax.jit(grad_fn)(qp, kp, vp, mp, wp)
    np.testing.assert_allclose(unpermute(np.asarray(out), p), ref_out, atol=2e-5, rtol=2e-5)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(unpermute(np.asarray(g), p), r, atol=5e-5, rtol=5e-5)
    return calls


@pytest.mark.slow
def test_ring_steps_with_the_pallas_gpu_kernel():
    """Ring attention with impl="pallas_gpu" (interpret mode): every ring step is the Triton kernel's block forward /
    backward (pallas_gpu.flash_attention_fwd_block / _bwd_block: its compacted tile lists skip the empty tiles inside
    a step), merged by log-sum-exp; forward and gradients match one-device dense attention."""
    from mllm_jax.kernels import context_parallel

    assert context_parallel._ring_kernel("pallas_gpu", 128) == "pallas_gpu"
    calls = _ring_vs_dense("pallas_gpu", dict(block_q=32, block_k=64), {"softcap": 3.0, "window": 100}, seed=9)
    assert calls >= 3, calls  # the forward block, then dQ and dK/dV blocks, inside the ring's scan and cond


def _kernels_in_loops(hlo_text: str) -> dict:
    """{pallas kernel name: calls} of the Pallas calls in compiled HLO that sit inside a while loop's body (directly
    or in a computation it calls: the ring's cond branches), from the computations' call graph."""
    import re

    from mllm_jax.train import compile_target as ct

    comps, name = {}, None
    for line in hlo_text.splitlines():
        head = re.match(r"^(?:ENTRY )?%([\w.\-]+) \(", line)
        if head:
            name = head.group(1)
            comps[name] = []
        elif name is not None:
            comps[name].append(line)
    ref = r"(?:body|calls|to_apply|true_computation|false_computation)=%([\w.\-]+)"
    callees = {c: set(re.findall(ref, "\n".join(body))) | {
        x for group in re.findall(r"branch_computations=\{([^}]*)\}", "\n".join(body))
        for x in re.findall(r"%([\w.\-]+)", group)} for c, body in comps.items()}
    seen = set()
    todo = [m for body in comps.values() for m in re.findall(r"body=%([\w.\-]+)", "\n".join(body))]
    while todo:
        c = todo.pop()
        if c not in seen:
            seen.add(c)
            todo.extend(callees.get(c, ()))
    return ct.pallas_kernels("\n".join(line for c in seen for line in comps.get(c, ())))


@needs_cuda
@pytest.mark.slow
def test_ring_compiles_for_h100_with_the_triton_kernels_inside_the_ring():
    """The ring's forward and backward compiled for 4 H100s by the deviceless CUDA back end (impl "auto" on the GPU
    target's mesh is pallas_gpu): each ring step's forward, dQ and dK/dV are Triton kernels inside the ring's loop
    (its scan over the first cp - 1 steps), beside the collective permutes that move K/V round the ring."""
    from mllm_jax.train import compile_target as ct
    from mllm_jax.train import targets

    mesh = jax.sharding.Mesh(np.asarray(targets.parse("gpu:h100:1x4").devices()), ("context",))
    b, s, hq, hkv, d = 1, 2048, 4, 2, 128
    seq = NamedSharding(mesh, P(None, "context"))
    x = lambda h: jax.ShapeDtypeStruct((b, s, h, d), jnp.bfloat16, sharding=seq)  # noqa: E731
    m = jax.ShapeDtypeStruct((b, s), jnp.int32, sharding=seq)

    def loss(q, k, v, meta):
        return context_attention(q, k, v, meta, meta, mesh=mesh, method="ring").astype(jnp.float32).sum()

    compiled, _, _ = ct.compile_on_target(jax.jit(jax.grad(loss, (0, 1, 2))), (x(hq), x(hkv), x(hkv),
                                          TokenMeta(m, m, m)), mesh, what="gpu:h100:1x4 ring")
    text = compiled.as_text()
    names = ("multimodal_flash_fwd", "multimodal_flash_dq", "multimodal_flash_dkv")
    in_loops = _kernels_in_loops(text)
    assert all(in_loops.get(n, 0) >= 1 for n in names), in_loops
    # cp = 4 steps: the scanned cp - 1 and the last one, so each kernel appears twice (not unrolled 4 times).
    assert ct.pallas_kernels(text) == {n: 2 for n in names}, ct.pallas_kernels(text)
    assert ct.collectives(text)["collective-permute"]["count"] >= 2


@pytest.mark.slow
def test_per_rank_balance_check_runs_the_real_ring_and_catches_a_wrong_plan():
    """benchmarks.cp_balance.measured_rank_tiles compiles and runs context_attention (ring, kernels.tiled steps) on 4
    of the 8 fake devices and counts each rank's tiles in the kernel's own tile loop. With the plan that permuted the
    batch it equals the planner's per-rank tiles; a deliberately wrong plan (made for another batch's metadata, then
    applied to this one) predicts other per-rank tiles than the attention computes, and the check says so."""
    from benchmarks.cp_balance import measured_rank_tiles

    cp, s = 4, 2048
    meta = _meta(("multimodal_packed",), s, seed=2)
    right = plan(meta, cp, "balanced", block=128, tile_k=128)
    measured = measured_rank_tiles(meta, right)
    np.testing.assert_array_equal(measured, right.rank_tiles)
    other = _meta(("video",), s, seed=3)
    wrong = plan(other, cp, "balanced", block=128, tile_k=128)
    measured_wrong = measured_rank_tiles(meta, wrong)
    assert not np.array_equal(measured_wrong, wrong.rank_tiles), (measured_wrong, wrong.rank_tiles)
    # The same tiles in total (a permutation moves whole blocks), differently spread over the ranks.
    assert measured_wrong.sum() == right.rank_tiles.sum()
