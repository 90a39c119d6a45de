"""kernels.cpu_attention (the tile-skipping head-major CPU path layers.attend takes from TILED_MIN_KEYS keys) against
the dense reference (kernels.reference), forward and dQ/dK/dV: every mask family (packing, image/video/audio spans,
padding, permuted tokens), sliding windows, softcap, span isolation, GQA, q and k of different lengths, rows that
attend nothing; plus the dispatch in layers.attend and a whole LLM forward and gradient on the tiled path against the
dense one.

The metadata goes into the jitted functions as traced arguments, so one compilation serves all families."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mllm_jax.kernels import TokenMeta
from mllm_jax.kernels.cpu_attention import tiled_attention
from mllm_jax.kernels.dispatch import DENSE_MAX_KEYS, TILED_MIN_KEYS
from mllm_jax.kernels.reference import reference_attention
from kernel_testlib import random_inputs, value_and_grads as _value_and_grads
from mask_families import all_cases, cases_with_permutations, make_meta, take_tokens
from mllm_jax import layers as L

B, S, D = 2, 100, 16  # S is not a multiple of the blocks
BLOCKS = dict(block_q=16, block_k=32)
OPTIONS = [dict(), dict(window=9, softcap=5.0), dict(span_isolated=True), dict(scale=0.3, softcap=2.0, window=30)]


def _inputs(b=B, sq=S, sk=S, hq=4, hkv=2, d=D, dtype=jnp.float32, seed=0):
    return random_inputs(b, sq, sk, hq, hkv, d, dtype, seed)


def _tiled(q, k, v, qm, km, **kw):
    return tiled_attention(q, k, v, qm, km, **BLOCKS, **kw)


def _tiled_default_blocks(q, k, v, qm, km, **kw):
    return tiled_attention(q, k, v, qm, km, **kw)


def _assert_close(got, want, what, atol=1e-4, rtol=1e-4):
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert g.shape == w.shape and g.dtype == w.dtype, f"{what}: {name} {g.shape} {g.dtype} vs {w.shape} {w.dtype}"
        assert not jnp.isnan(g).any(), f"{what}: NaN in {name}"
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=atol, rtol=rtol, err_msg=f"{what}: {name}")


def _cases():
    """(name, q_meta, k_meta, k_index): all families with padding, plus q and k permuted independently."""
    return cases_with_permutations(B, S)


@pytest.mark.parametrize("opts,hq,hkv", [(o, 4, 2) for o in OPTIONS] + [(OPTIONS[0], 2, 2), (OPTIONS[1], 3, 1)],
                         ids=lambda x: (",".join(x) or "plain") if isinstance(x, dict) else str(x))
def test_forward_and_grads_match_reference(opts, hq, hkv):
    q, k, v, d_out = _inputs(hq=hq, hkv=hkv)
    key = tuple(sorted(opts.items()))
    for name, qm, km, k_index in _cases():
        kk, vv = (k, v) if k_index is None else (take_tokens(k, k_index), take_tokens(v, k_index))
        args = (q, kk, vv, qm, km, d_out)
        want = _value_and_grads(reference_attention, key)(*args)
        got = _value_and_grads(_tiled, key)(*args)
        _assert_close(got, want, f"{name} {opts} hq={hq} hkv={hkv}")


def test_default_blocks_and_query_key_lengths_differ():
    # Default blocks (one tile when shorter than 128), and cross attention: 70 queries against 300 keys.
    q, k, v, d_out = _inputs(sq=70, sk=300, hq=4, hkv=1)
    qm = make_meta("packed", B, 70, seed=5, pad=3)
    km = make_meta("packed", B, 300, seed=6, pad=11)
    for impl in (_tiled, _tiled_default_blocks):
        got = _value_and_grads(impl, (("window", 40),))(q, k, v, qm, km, d_out)
        want = _value_and_grads(reference_attention, (("window", 40),))(q, k, v, qm, km, d_out)
        _assert_close(got, want, f"cross {impl.__name__}")


def test_rows_that_see_nothing_give_zero_output_and_zero_grads():
    q, k, v, d_out = _inputs(b=1, sq=40, sk=48)
    seg_q = np.array([[1] * 10 + [3] * 20 + [0] * 10], np.int32)
    qm = TokenMeta(np.arange(40, dtype=np.int32)[None], seg_q, np.zeros((1, 40), np.int32))
    km = TokenMeta(np.arange(48, dtype=np.int32)[None], np.array([[1] * 30 + [2] * 18], np.int32),
                   np.zeros((1, 48), np.int32))
    out, dq, dk, dv = _value_and_grads(_tiled, ())(q, k, v, qm, km, d_out)
    want = _value_and_grads(reference_attention, ())(q, k, v, qm, km, d_out)
    _assert_close((out, dq, dk, dv), want, "empty rows")
    assert np.all(np.asarray(out)[0, 10:] == 0) and np.all(np.asarray(dq)[0, 10:] == 0)
    assert np.all(np.asarray(dk)[0, 30:] == 0) and np.all(np.asarray(dv)[0, 30:] == 0)
    km0 = TokenMeta(km.positions, np.zeros_like(km.segment_ids), km.span_ids)  # every key is padding
    for g in _value_and_grads(_tiled, ())(q, k, v, qm, km0, d_out):
        assert np.all(np.asarray(g) == 0)


def test_bf16_matches_reference_within_bf16_rounding():
    # The tolerances of the blockwise path's bf16 test (same roundings: per-tile probabilities rounded to bf16 before
    # P @ V with a running max, outputs rounded to bf16 again).
    q, k, v, d_out = _inputs(dtype=jnp.bfloat16)
    f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
    for name, meta in all_cases(B, S, seed=1, pad=7)[1:3]:
        got = _value_and_grads(_tiled, ())(q, k, v, meta, meta, d_out)
        want = _value_and_grads(reference_attention, ())(f32(q), f32(k), f32(v), meta, meta, f32(d_out))
        assert all(g.dtype == jnp.bfloat16 for g in got)
        np.testing.assert_allclose(np.asarray(got[0], np.float32), want[0], atol=3e-2, rtol=3e-2)
        for g, w in zip(got[1:], want[1:]):
            np.testing.assert_allclose(np.asarray(g, np.float32), w, atol=6e-2, rtol=6e-2)


def test_attend_dispatches_by_key_count_on_cpu():
    assert TILED_MIN_KEYS <= DENSE_MAX_KEYS
    assert L.uses_cpu_tiled("auto", TILED_MIN_KEYS) and not L.uses_head_major_dense("auto", TILED_MIN_KEYS)
    assert L.uses_head_major_dense("auto", TILED_MIN_KEYS - 1) and not L.uses_cpu_tiled("auto", TILED_MIN_KEYS - 1)
    assert not L.uses_cpu_tiled("auto", DENSE_MAX_KEYS + 1) and not L.uses_cpu_tiled("dense", TILED_MIN_KEYS)
    s = TILED_MIN_KEYS + 13
    q, k, v, d_out = _inputs(b=2, sq=s, sk=s, hq=4, hkv=2)
    meta = make_meta("packed", 2, s, seed=7, pad=40)
    kw = dict(window=50, softcap=4.0)

    def via_attend(q, k, v, qm, km, **kw):
        return L.attend(q, k, v, qm, **kw)

    got = _value_and_grads(via_attend, tuple(sorted(kw.items())))(q, k, v, meta, meta, d_out)
    want = _value_and_grads(reference_attention, tuple(sorted(kw.items())))(q, k, v, meta, meta, d_out)
    _assert_close(got, want, "attend, tiled path")
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        L.attend(q[:, :, :3], k, v, meta)


def test_llm_on_the_tiled_path_matches_the_dense_path():
    # A whole decoder (GQA, sliding window on alternate layers, softcap) at TILED_MIN_KEYS tokens: loss and
    # gradients with attention_impl="auto" (tiled on CPU) equal those with "dense" (the reference).
    import dataclasses

    from flax import nnx

    from mllm_jax.llm import LLM, RunSettings
    from model_testlib import TINY_LLM

    cfg = dataclasses.replace(TINY_LLM, sliding_window=60, sliding_window_pattern=2, attn_logit_softcap=5.0)
    s = TILED_MIN_KEYS
    meta = make_meta("packed", 2, s, seed=8, pad=30)
    ids = jax.random.randint(jax.random.PRNGKey(1), (2, s), 0, cfg.vocab_size)
    results = []
    for impl in ("auto", "dense"):
        model = LLM(cfg, rngs=nnx.Rngs(0), run=RunSettings(attention_impl=impl))
        graphdef, params = nnx.split(model)

        def loss(params, graphdef=graphdef):
            logits = nnx.merge(graphdef, params)(ids, TokenMeta(*(jnp.asarray(a) for a in meta)))
            return jnp.mean(jax.nn.logsumexp(logits, axis=-1) * (meta.segment_ids != 0))

        results.append(jax.jit(jax.value_and_grad(loss))(params))
    (l_tiled, g_tiled), (l_dense, g_dense) = results
    np.testing.assert_allclose(l_tiled, l_dense, atol=1e-5, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g_tiled), jax.tree.leaves(g_dense)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)


def test_sharded_batch_falls_back_to_dense_and_shard_map_keeps_tiled():
    # Explicitly sharded arrays: the tiled path's per-row loops cannot index a sharded batch, so attend takes the
    # dense head-major path there; inside shard_map (manual axes, whole local arrays) it stays tiled. Both exact.
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

    mesh = jax.make_mesh((4, 2), ("data", "tensor"), axis_types=(AxisType.Explicit,) * 2, devices=jax.devices()[:8])
    s = TILED_MIN_KEYS + 5
    q, k, v, d_out = _inputs(b=8, sq=s, sk=s, hq=4, hkv=2)
    meta = make_meta("packed", 8, s, seed=9, pad=20)
    want = _value_and_grads(reference_attention, ())(q, k, v, meta, meta, d_out)

    def via_attend(q, k, v, qm, km):
        return L.attend(q, k, v, qm, context_parallel=False)

    def local(q, k, v, qm, km):
        assert L.uses_cpu_tiled("auto", s), "inside shard_map the arrays are whole: the tiled path applies"
        return via_attend(q, k, v, qm, km)

    def per_shard(q, k, v, qm, km):
        return jax.shard_map(local, in_specs=(P("data"),) * 3 + (P("data"),) * 2, out_specs=P("data"),
                             check_vma=False)(q, k, v, qm, km)

    with jax.set_mesh(mesh):
        assert not L.uses_cpu_tiled("auto", s) and L.uses_head_major_dense("auto", s)
        put = lambda x: jax.device_put(jnp.asarray(x), NamedSharding(mesh, P("data")))  # noqa: E731
        args = [put(x) for x in (q, k, v)] + [TokenMeta(*map(put, m)) for m in (meta, meta)] + [put(d_out)]
        _assert_close(_value_and_grads(via_attend, ())(*args), want, "explicit batch sharding")
        _assert_close(_value_and_grads(per_shard, ())(*args), want, "shard_map over the batch")
