"""kernels.pallas_tpu: the Mosaic flash attention against the dense reference (forward and dQ/dK/dV) in TPU interpret
mode, its tile skipping against the exact tile map, and its compile by the TPU compiler (libtpu) for v5e and v5p."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mllm_jax.kernels import pallas_tpu
from mllm_jax.kernels.meta import FULL, PARTIAL, SKIP, TokenMeta, block_map, dense_block_map
from mllm_jax.kernels.reference import reference_attention
from kernel_testlib import compile_on_one_device
from mask_families import make_meta, permute, take_tokens

F32_TOL = 1e-4


def _inputs(batch, sq, sk, hq, hkv, d, dtype=jnp.float32, seed=0):
    kq, kk, kv, kg = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(kq, (batch, sq, hq, d), jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (batch, sk, hkv, d), jnp.float32).astype(dtype)
    v = jax.random.normal(kv, (batch, sk, hkv, d), jnp.float32).astype(dtype)
    d_out = jax.random.normal(kg, (batch, sq, hq, d), jnp.float32).astype(dtype)
    return q, k, v, d_out


def _value_and_grads(fn, q, k, v, d_out):
    """(out, dq, dk, dv) for cotangent d_out; jitted, which in interpret mode costs a third of eager dispatch."""

    @jax.jit
    def run(q, k, v, d_out):
        out, vjp = jax.vjp(fn, q, k, v)
        return (out, *vjp(d_out))

    return run(q, k, v, d_out)


def _kernel_and_reference(q, k, v, d_out, q_meta, k_meta, **kw):
    """(out, dq, dk, dv) of the kernel in interpret mode and of the dense reference, on the same inputs."""
    kernel_kw = {key: kw.pop(key) for key in ("block_q", "block_k") if key in kw}
    got = _value_and_grads(
        lambda q, k, v: pallas_tpu.flash_attention(q, k, v, q_meta, k_meta, interpret=True, **kernel_kw, **kw),
        q, k, v, d_out)
    want = _value_and_grads(lambda q, k, v: reference_attention(q, k, v, q_meta, k_meta, **kw), q, k, v, d_out)
    return got, want


def _assert_close(got, want, atol, rtol):
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert g.shape == w.shape and g.dtype == w.dtype, (name, g.shape, w.shape, g.dtype, w.dtype)
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), atol=atol, rtol=rtol,
                                   err_msg=name)


def _jnp_meta(meta: TokenMeta) -> TokenMeta:
    return TokenMeta(*(jnp.asarray(a) for a in meta))


# (family, batch, length, q heads, kv heads, extra kwargs): every mask family of the brief, GQA, window, softcap.
CASES = [
    ("causal", 1, 256, 1, 1, {}),
    ("llava", 1, 256, 4, 2, {}),  # GQA: 2 kv heads, group 2
    ("interleaved", 1, 384, 2, 1, {}),  # MQA
    ("packed", 2, 256, 1, 1, {}),
    ("prefix_lm", 1, 256, 1, 1, {}),
    ("video", 1, 256, 1, 1, {"span_isolated": True}),
    ("causal", 1, 384, 1, 1, {"window": 100}),
    ("interleaved", 1, 256, 1, 1, {"window": 48, "softcap": 5.0}),
]


@pytest.mark.parametrize("family,batch,length,hq,hkv,kw", CASES, ids=lambda c: str(c))
def test_matches_reference_f32(family, batch, length, hq, hkv, kw):
    meta = _jnp_meta(make_meta(family, batch, length, seed=3, pad=length // 16))
    q, k, v, d_out = _inputs(batch, length, length, hq, hkv, 128)
    got, want = _kernel_and_reference(q, k, v, d_out, meta, meta, **kw)
    _assert_close(got, want, F32_TOL, F32_TOL)


def test_permuted_keys_match_reference():
    """Keys and values in a random order (the context-parallel case): the mask follows the metadata, not the index."""
    meta = make_meta("interleaved", 1, 384, seed=5)
    k_meta, index = permute(meta, seed=6)
    q, k, v, d_out = _inputs(1, 384, 384, 1, 1, 128, seed=1)
    k, v = take_tokens(k, index), take_tokens(v, index)
    got, want = _kernel_and_reference(q, k, v, d_out, _jnp_meta(meta), _jnp_meta(k_meta))
    _assert_close(got, want, F32_TOL, F32_TOL)
    # Shuffling the keys makes tiles mixed, yet the kernel still skips where the metadata allows none.
    assert (np.asarray(block_map(meta, k_meta, 128, 128)) != SKIP).any()


def test_ragged_lengths_and_chunked_queries():
    """Sq and Sk not multiples of the blocks, and queries that are the last tokens of the keys (a prefill chunk)."""
    full = make_meta("llava", 1, 328, seed=7)
    q_meta = TokenMeta(*(a[:, -200:] for a in full))
    q, k, v, d_out = _inputs(1, 200, 328, 1, 1, 128, seed=2)
    got, want = _kernel_and_reference(q, k, v, d_out, _jnp_meta(q_meta), _jnp_meta(full), block_q=64)
    _assert_close(got, want, F32_TOL, F32_TOL)


@pytest.mark.parametrize("head_dim", [64, 256])
def test_head_dims(head_dim):
    meta = _jnp_meta(make_meta("llava", 1, 256, seed=8))
    q, k, v, d_out = _inputs(1, 256, 256, 1, 1, head_dim, seed=3)
    got, want = _kernel_and_reference(q, k, v, d_out, meta, meta)
    _assert_close(got, want, F32_TOL, F32_TOL)


def test_bf16_matches_f32_reference():
    """bf16 inputs against the reference computed in f32 on the same (bf16-rounded) values.

    The kernel rounds p and dS to bf16 before the MXU products and rounds its outputs to bf16; each rounding is a
    relative error of at most 2^-9, and the products sum positive weights or a few hundred terms whose errors mostly
    cancel. So the error should be a few bf16 ulps of the largest value: we allow 4 * 2^-8 of each tensor's max
    magnitude (about 1.6%), which a wrong mask, a missing tile or a bad rescale exceeds by orders of magnitude.
    """
    meta = _jnp_meta(make_meta("interleaved", 1, 256, seed=9, pad=17))
    q, k, v, d_out = _inputs(1, 256, 256, 2, 1, 128, dtype=jnp.bfloat16, seed=4)
    got = _value_and_grads(
        lambda q, k, v: pallas_tpu.flash_attention(q, k, v, meta, meta, interpret=True), q, k, v, d_out)
    f32 = [x.astype(jnp.float32) for x in (q, k, v, d_out)]
    want = _value_and_grads(lambda q, k, v: reference_attention(q, k, v, meta, meta), *f32)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert g.dtype == jnp.bfloat16, (name, g.dtype)
        w = np.asarray(w)
        err = np.max(np.abs(np.asarray(g, np.float32) - w))
        assert err <= 4 * 2.0**-8 * np.max(np.abs(w)), (name, err, np.max(np.abs(w)))


def test_rows_that_see_nothing_give_zero_and_finite_grads():
    """Padding queries, queries of a segment absent from the keys and keys nobody sees: 0 out, 0 grads, no NaN."""
    s = 256
    pos = np.arange(s, dtype=np.int32)[None]
    q_seg = np.ones((1, s), np.int32)
    q_seg[:, 40:90] = 3  # no key has segment 3
    q_seg[:, 230:] = 0  # padding
    k_seg = np.ones((1, s), np.int32)
    k_seg[:, 150:] = 2  # no query has segment 2
    zeros = np.zeros((1, s), np.int32)
    q_meta, k_meta = _jnp_meta(TokenMeta(pos, q_seg, zeros)), _jnp_meta(TokenMeta(pos, k_seg, zeros))
    q, k, v, d_out = _inputs(1, s, s, 1, 1, 128, seed=5)
    got, want = _kernel_and_reference(q, k, v, d_out, q_meta, k_meta)
    out, dq, dk, dv = (np.asarray(x) for x in got)
    assert all(np.isfinite(x).all() for x in (out, dq, dk, dv))
    blind_q = (q_seg[0] == 3) | (q_seg[0] == 0)
    unseen_k = k_seg[0] == 2
    assert np.all(out[0, blind_q] == 0) and np.all(dq[0, blind_q] == 0)
    assert np.all(dk[0, unseen_k] == 0) and np.all(dv[0, unseen_k] == 0)
    _assert_close(got, want, F32_TOL, F32_TOL)


def test_skipped_tiles_are_never_computed():
    """Every tile the three kernels compute is recorded: exactly the non-skipped tiles, once per head, masked exactly
    on the partial ones; and no tile the exact (dense) tile map calls empty is ever computed."""
    batch, length, hq, hkv, bq, bk = 2, 384, 2, 1, 128, 128
    meta = make_meta("packed", batch, length, seed=11, pad=40)
    q, k, v, d_out = _inputs(batch, length, length, hq, hkv, 128, seed=6)
    jmeta = _jnp_meta(meta)
    with pallas_tpu.record_computed_tiles() as computed:
        outs = _value_and_grads(
            lambda q, k, v: pallas_tpu.flash_attention(q, k, v, jmeta, jmeta, block_q=bq, block_k=bk,
                                                       interpret=True), q, k, v, d_out)
        jax.block_until_ready(outs)
    bmap = np.asarray(block_map(meta, meta, bq, bk))
    exact = dense_block_map(meta, meta, bq, bk)
    assert (bmap == SKIP).sum() > 0 and (bmap == FULL).sum() > 0, "the case must exercise skipping and full tiles"
    assert np.all(bmap[exact != SKIP] != SKIP), "the block map skips a tile that has visible pairs"
    expected = sorted(
        (b, h, i, j, bool(bmap[b, i, j] == PARTIAL))
        for b, i, j in zip(*np.nonzero(bmap != SKIP))
        for h in range(hq)
    )
    for kernel in ("fwd", "dq", "dkv"):
        tiles = sorted(t[1:] for t in computed if t[0] == kernel)
        assert tiles == expected, kernel
    # The grid has batch * heads * nQ * nK steps per kernel; the computed ones are strictly fewer.
    assert len(expected) < batch * hq * bmap.shape[1] * bmap.shape[2]


def test_tile_plan_only_visits_listed_blocks():
    """The compacted lists the index_maps read: the live blocks in ascending order, then the last one repeated (the
    same block index on consecutive grid steps, so nothing new is fetched)."""
    meta = make_meta("interleaved", 2, 640, seed=12, pad=140)  # the last q block is all padding
    (kv_blocks, kinds, counts), (q_blocks, kinds_t, counts_t) = pallas_tpu.tile_plan(_jnp_meta(meta),
                                                                                      _jnp_meta(meta), 128, 128)
    bmap = np.asarray(block_map(meta, meta, 128, 128))
    for plan, tiles in (((kv_blocks, kinds, counts), bmap), ((q_blocks, kinds_t, counts_t), bmap.transpose(0, 2, 1))):
        lists, kind_lists, count = (np.asarray(a) for a in plan)
        for b in range(tiles.shape[0]):
            for i in range(tiles.shape[1]):
                live = np.nonzero(tiles[b, i])[0]
                n = count[b, i]
                assert n == len(live)
                np.testing.assert_array_equal(lists[b, i, :n], live)
                np.testing.assert_array_equal(kind_lists[b, i, :n], tiles[b, i, live])
                assert np.all(lists[b, i, n:] == (live[-1] if n else 0))
    assert (counts == 0).any() and (counts < bmap.shape[2]).all(), "the case must have empty and sparse rows"


@pytest.mark.parametrize("target", ["tpu:v5e:1x1", "tpu:v5p:2x2x1"])
def test_compiles_with_mosaic_for_tpu_forward_and_backward(target):
    """The TPU compiler itself (XLA:TPU + Mosaic, from libtpu, no TPU needed) on v5e and v5p: GQA, bf16, head dim
    128, window and softcap, jitted forward and gradient. Mosaic rejects at compile what it cannot lay out (exporting
    would not: test_compile_target shows a broken kernel rejected by this same path)."""
    b, s, hq, hkv, d = 1, 384, 4, 2, 128
    q = jax.ShapeDtypeStruct((b, s, hq, d), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((b, s, hkv, d), jnp.bfloat16)
    meta = TokenMeta(*(jax.ShapeDtypeStruct((b, s), jnp.int32) for _ in range(3)))

    def forward(q, k, v, meta):
        return pallas_tpu.flash_attention(q, k, v, meta, meta, window=128, softcap=30.0)

    def loss(q, k, v, meta):
        return jnp.sum(forward(q, k, v, meta).astype(jnp.float32))

    fwd, fwd_text = compile_on_one_device(target, forward, q, kv, kv, meta)
    # The kernel declares its FLOPs (pl.CostEstimate: every grid step a tile, QK^T and PV), so the compiler's cost
    # analysis counts them: grid (1 batch, 4 heads, 3 q blocks, 3 k blocks) of 128 x 128 tiles at head dim 128.
    assert fwd.cost_analysis()["flops"] >= 4 * (1 * 4 * 3 * 3) * 128 * 128 * 128
    bwd, bwd_text = compile_on_one_device(target, jax.grad(loss, argnums=(0, 1, 2)), q, kv, kv, meta)
    assert fwd_text.count("custom_call_target=\"tpu_custom_call\"") == 1
    # forward (for the residuals), dQ, dK/dV
    assert bwd_text.count("custom_call_target=\"tpu_custom_call\"") == 3, bwd_text.count("tpu_custom_call")
    assert bwd.memory_analysis().temp_size_in_bytes >= 0
    assert [o.dtype for o in jax.tree.leaves(bwd.out_info)] == [jnp.bfloat16] * 3


@pytest.mark.parametrize(
    "kwargs,match",
    [({"block_k": 96}, "block_k"), ({"block_q": 12}, "block_q"), ({"window": 0}, "window"), ({"softcap": -1.0},
                                                                                             "softcap")],
)
def test_bad_arguments_raise_value_error(kwargs, match):
    meta = TokenMeta.causal(1, 128, xp=jnp)
    q = jnp.zeros((1, 128, 2, 128))
    with pytest.raises(ValueError, match=match):
        pallas_tpu.flash_attention(q, q, q, meta, meta, interpret=True, **kwargs)


def test_heads_must_divide():
    meta = TokenMeta.causal(1, 128, xp=jnp)
    with pytest.raises(ValueError, match="query heads"):
        pallas_tpu.flash_attention(jnp.zeros((1, 128, 3, 128)), jnp.zeros((1, 128, 2, 128)),
                                   jnp.zeros((1, 128, 2, 128)), meta, meta)


def test_dispatch_under_forced_tpu_interpret_mode():
    """kernels.attention(impl="pallas_tpu") reaches this kernel with the contract's signature, and the kernel also
    runs when interpretation is forced from outside (how context-parallel tests run it inside shard_map)."""
    from jax.experimental.pallas import tpu as pltpu

    from mllm_jax import kernels

    meta = _jnp_meta(make_meta("audio_image", 1, 256, seed=13, pad=9))
    q, k, v, _ = _inputs(1, 256, 256, 2, 1, 128, seed=7)
    with pltpu.force_tpu_interpret_mode():
        got = jax.jit(lambda q, k, v: kernels.attention(q, k, v, meta, meta, impl="pallas_tpu", softcap=20.0))(q, k, v)
    want = reference_attention(q, k, v, meta, meta, softcap=20.0)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=F32_TOL, rtol=F32_TOL)
