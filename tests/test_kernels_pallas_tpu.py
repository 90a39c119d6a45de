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
from mask_families import cases_with_permutations, make_meta, permute, take_tokens

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
    got, want = _kernel_and_reference(q, k, v, d_out, _jnp_meta(q_meta), _jnp_meta(full), block_q=128)
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


def _listed(chunks):
    """(row, col, kind) of every listed tile of a chunk list, in order."""
    out = []
    for c in chunks:
        rows, cols, n = np.asarray(c.rows), np.asarray(c.cols), int(c.count)
        assert rows[n] == -1, "a list ends with the -1 sentinel row"
        out += [(int(r), int(x) & ((1 << 28) - 1), int(x) >> 28) for r, x in zip(rows[:n], cols[:n])]
    return out


def test_tile_plan_lists_exactly_the_live_tiles_host_and_traced():
    """The lists the grids walk: every live tile of the block map once, resident block major, ascending; the host
    lists (concrete metadata) and the device lists (traced metadata) agree; chunks split at row boundaries."""
    meta = make_meta("interleaved", 2, 640, seed=12, pad=140)  # the last q block is all padding
    bq, bk = 128, 128
    bmap = np.asarray(block_map(meta, meta, bq, bk))
    b, nq, nk = bmap.shape
    plans = {max_tiles: (pallas_tpu.tile_plan(meta, meta, bq, bk, max_tiles=max_tiles),
                         jax.jit(lambda m: pallas_tpu.tile_plan(m, m, bq, bk, max_tiles=max_tiles))(_jnp_meta(meta)))
             for max_tiles in (pallas_tpu.MAX_TILES_PER_CALL, 7)}  # one chunk; many chunks of at most 7 tiles
    for major, tiles in (("q_major", bmap), ("k_major", bmap.transpose(0, 2, 1))):
        bi, ri, ci = np.nonzero(tiles)
        want = [(bb * tiles.shape[1] + r, bb * tiles.shape[2] + c, tiles[bb, r, c]) for bb, r, c in zip(bi, ri, ci)]
        for max_tiles, (host_plan, device_plan) in plans.items():
            host, device = getattr(host_plan, major), getattr(device_plan, major)
            assert _listed(host) == want and _listed(device) == want, (major, max_tiles)
            for c in host + device:
                rows = np.asarray(c.rows)[: int(c.count)]
                assert np.all((rows >= c.start) & (rows < c.stop)), "a chunk holds whole rows of its own range"
                assert pallas_tpu.smem_bytes(c) <= 8 * (max_tiles + 1)
            if max_tiles == 7:
                assert len(host) > 1 and max(int(c.count) for c in host) <= 7
    assert (bmap == SKIP).all(axis=2).any(), "the case must have an empty q row"


def _grids(fn, *args):
    """The grids of the pallas_calls in fn's jaxpr (dynamic bounds as None)."""
    from jax.extend.core import jaxprs_in_params

    grids = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "pallas_call":
                grids.append((eqn.params["name"] if "name" in eqn.params else eqn.params["name_and_src_info"].name,
                              tuple(g if isinstance(g, int) else None for g in eqn.params["grid_mapping"].grid)))
            for sub in jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return grids


@pytest.mark.parametrize("family", ["causal", "packed"])
def test_grid_size_equals_live_tiles(family):
    """Each kernel's grid is (kv heads, live tiles): with concrete metadata the static grid of the forward, dQ and
    dK/dV calls sums to the live tiles of the block map (no step for a skipped tile, none for padding); with traced
    metadata the grid bound is the traced count, which equals the same number."""
    b, s, hq, hkv, bq, bk = 2, 1024, 4, 2, 128, 256
    meta = make_meta(family, b, s, seed=21, pad=100)
    live = int((np.asarray(block_map(meta, meta, bq, bk)) != SKIP).sum())
    assert live < b * (s // bq) * (s // bk), "the case must have skipped tiles"
    q, k, v, d_out = _inputs(b, s, s, hq, hkv, 128)

    def loss(q, k, v, m):
        return jnp.sum(pallas_tpu.flash_attention(q, k, v, m, m, block_q=bq, block_k=bk, interpret=True) * d_out)

    grids = _grids(jax.grad(lambda q, k, v: loss(q, k, v, meta), argnums=(0, 1, 2)), q, k, v)
    by_kernel = {}
    for name, (heads, steps) in grids:
        assert heads == hkv
        by_kernel[name] = by_kernel.get(name, 0) + steps
    assert by_kernel == {"mllm_flash_fwd": live, "mllm_flash_dq": live, "mllm_flash_dkv": live}, (by_kernel, live)
    traced = jax.jit(lambda m: pallas_tpu.plan_steps(pallas_tpu.tile_plan(m, m, bq, bk)))(_jnp_meta(meta))
    assert {k: int(v) for k, v in traced.items()} == {"fwd": live, "dq": live, "dkv": live}
    assert all(g[1][1] is None for g in _grids(jax.grad(loss, argnums=(0, 1, 2)), q, k, v, _jnp_meta(meta)))


def _few_tiles_per_call(monkeypatch, max_tiles):
    """Cut the tile lists into chunks of at most ``max_tiles`` (several pallas_calls per pass, aliased outputs)."""
    monkeypatch.setattr(pallas_tpu.tile_plan, "__kwdefaults__", {"window": None, "span_isolated": False,
                                                                 "max_tiles": max_tiles})


def test_traced_metadata_any_alignment_matches_reference(monkeypatch):
    """Metadata as jit arguments (the training case: device tile lists, dynamic grid bounds, one row of blocks per
    call): queries and keys independently permuted (spans, segments and padding at any offset), forward and grads."""
    _few_tiles_per_call(monkeypatch, 3)
    cases = {c[0]: c for c in cases_with_permutations(1, 384)}
    for name, q_meta, k_meta, k_index in (cases["q_and_k_permuted"],):  # spans, segments and padding anywhere
        q, k, v, d_out = _inputs(1, 384, 384, 2, 1, 128, seed=len(name))
        if k_index is not None:
            k, v = take_tokens(k, k_index), take_tokens(v, k_index)

        @jax.jit
        def run(q, k, v, qm, km, d_out):
            out, vjp = jax.vjp(lambda q, k, v: pallas_tpu.flash_attention(
                q, k, v, qm, km, block_q=128, block_k=128, interpret=True), q, k, v)
            return (out, *vjp(d_out))

        got = run(q, k, v, _jnp_meta(q_meta), _jnp_meta(k_meta), d_out)
        want = _value_and_grads(lambda q, k, v: reference_attention(q, k, v, q_meta, k_meta), q, k, v, d_out)
        _assert_close(got, want, F32_TOL, F32_TOL)


def test_matches_reference_at_hardware_blocks(monkeypatch):
    """The default v5e blocks (512 x 1024) on a packed batch with GQA: partial tiles of several segments and spans,
    ragged padding, rows resident over several streamed blocks; host tile lists cut into calls of at most 3 tiles."""
    _few_tiles_per_call(monkeypatch, 3)
    assert pallas_tpu.default_blocks(128, "v5e") == (512, 1024)
    meta = _jnp_meta(make_meta("packed", 1, 1536, seed=4, pad=77))
    q, k, v, d_out = _inputs(1, 1536, 1536, 2, 1, 128, seed=9)
    got, want = _kernel_and_reference(q, k, v, d_out, meta, meta, block_q=512, block_k=1024)
    _assert_close(got, want, F32_TOL, F32_TOL)


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
    # The kernel declares its FLOPs (pl.CostEstimate: every listed tile, QK^T and PV), so the compiler's cost
    # analysis counts them: one 384 x 384 tile (the default blocks shrunk to the sequence) for 4 query heads.
    assert fwd.cost_analysis()["flops"] >= 4 * 4 * 384 * 384 * 128
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


def _causal_specs(s, hq, hkv, d=128):
    return (jax.ShapeDtypeStruct((1, s, hq, d), jnp.bfloat16), jax.ShapeDtypeStruct((1, s, hkv, d), jnp.bfloat16))


def test_compiles_at_128k_tokens_within_smem_and_vmem():
    """Causal attention over 128K tokens (B=1, 4 query heads, 2 kv heads), forward and backward, compiled by Mosaic
    for v5e at the default blocks: every call's scalar-prefetched tile list within SMEM_BUDGET_BYTES (the host lists
    hold exactly the live tiles) and every call compiled under a scoped-VMEM limit within VMEM_LIMIT_BYTES (Mosaic
    refuses a kernel whose buffers exceed its limit: see the next tests). The traced-metadata plan at 128K stays
    within the same SMEM bound by chunking."""
    s = 131072
    meta = TokenMeta.causal(1, s)
    bq, bk = pallas_tpu.default_blocks(128, "v5e")
    plan = pallas_tpu.tile_plan(meta, meta, bq, bk)
    live = int((np.asarray(block_map(meta, meta, bq, bk)) != SKIP).sum())
    assert pallas_tpu.plan_steps(plan) == {"fwd": live, "dq": live, "dkv": live}
    for chunk in plan.q_major + plan.k_major:
        assert pallas_tpu.smem_bytes(chunk) <= pallas_tpu.SMEM_BUDGET_BYTES < pallas_tpu.SMEM_BYTES
    traced = jax.eval_shape(lambda m: pallas_tpu.tile_plan(m, m, bq, bk), TokenMeta.causal(1, s, xp=jnp))
    assert len(traced.q_major) > 1 and all(pallas_tpu.smem_bytes(c) <= pallas_tpu.SMEM_BUDGET_BYTES
                                           for c in traced.q_major + traced.k_major)
    for kernel in ("fwd", "dq", "dkv"):
        spec = pallas_tpu.kernel_spec(kernel, 2, bq, bk, 128, jnp.bfloat16)
        assert spec.vmem_bytes <= pallas_tpu.vmem_limit(spec) <= pallas_tpu.VMEM_LIMIT_BYTES

    def loss(q, k, v):
        return jnp.sum(pallas_tpu.flash_attention(q, k, v, meta, meta, generation="v5e").astype(jnp.float32))

    q, kv = _causal_specs(s, 4, 2)
    compiled, text = compile_on_one_device("tpu:v5e:1x1", jax.grad(loss, argnums=(0, 1, 2)), q, kv, kv)
    assert text.count('custom_call_target="tpu_custom_call"') == 3
    # The declared cost counts the live tiles exactly: fwd 4 + dQ 6 + dK/dV 8 units per tile and query head.
    assert compiled.cost_analysis()["flops"] >= 18 * live * 4 * bq * bk * 128


def test_compile_check_rejects_a_kernel_over_vmem(monkeypatch):
    """The compile check can fail: the scoped-VMEM limit a call declares forced down to 4 MiB while its 1024 x 1024
    tiles need several times that (kernel_spec's estimate) is refused by the TPU compiler (CompileTimeScopedVmemOom);
    under its own limit (vmem_limit) the same blocks compile in the 128K test above."""
    assert pallas_tpu.kernel_spec("fwd", 1, 1024, 1024, 128, jnp.bfloat16).vmem_bytes > 4 << 20
    monkeypatch.setattr(pallas_tpu, "vmem_limit", lambda spec: 4 << 20)
    q, kv = _causal_specs(2048, 1, 1)
    meta = TokenMeta.causal(1, 2048)
    with pytest.raises(Exception, match="(?i)vmem"):
        compile_on_one_device("tpu:v5e:1x1", lambda q, k, v: pallas_tpu.flash_attention(
            q, k, v, meta, meta, block_q=1024, block_k=1024), q, kv, kv)


def test_compile_check_rejects_a_tile_list_over_smem(monkeypatch):
    """Without the chunking bound (max_tiles lifted), the one tile list of 128 x 128 blocks over 64K causal tokens
    (131K live tiles, 8 bytes each) exceeds the 1 MiB SMEM and the TPU compiler refuses the call: the bound is what
    keeps the 128K compile above within SMEM."""
    s, block = 65536, 128
    meta = TokenMeta.causal(1, s)
    plan = pallas_tpu.tile_plan(meta, meta, block, block, max_tiles=1 << 30)
    assert len(plan.q_major) == 1 and pallas_tpu.smem_bytes(plan.q_major[0]) > pallas_tpu.SMEM_BYTES
    monkeypatch.setattr(pallas_tpu.tile_plan, "__kwdefaults__", {"window": None, "span_isolated": False,
                                                                 "max_tiles": 1 << 30})
    q, kv = _causal_specs(s, 1, 1)
    with pytest.raises(Exception, match="(?i)smem"):
        compile_on_one_device("tpu:v5e:1x1", lambda q, k, v: pallas_tpu.flash_attention(
            q, k, v, meta, meta, block_q=block, block_k=block), q, kv, kv)


def test_benchmark_models_splash_from_its_own_mask_info():
    """benchmarks/attention.py models splash attention's grid from the tile map (shrunk width = the longest row's live
    blocks, live and partial blocks as splash counts them); checked against splash's own process_mask on every
    family, and our side of the model counts exactly the live tiles as grid steps."""
    from benchmarks import attention as bench

    bq, bk = pallas_tpu.default_blocks(128, "v5e")
    assert bench.check_splash_emulation(bq, bk, length=2048) == list(bench.FAMILIES)
    meta = make_meta("llava", 1, 8192, seed=1)
    bmap = np.asarray(block_map(meta, meta, bq, bk))
    ours = bench.ours_passes(pallas_tpu.tile_plan(meta, meta, bq, bk), bmap[0], bq, bk, 32, 8, 128, jnp.bfloat16)
    live = int((bmap != SKIP).sum())
    assert all(p["grid_equals_live"] and p["steps"] == 8 * live for p in ours.values())
    splash = bench.splash_passes(bench.exact_tile_map(meta, bq, bk)[0], bq, bk, 32, 8, 128)
    assert splash["fwd"]["steps"] == 32 * bmap.shape[1] * bench._splash_lists(bmap[0]) > 32 * live
