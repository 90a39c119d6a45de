"""kernels.tiled (the XLA path from TILED_MIN_KEYS keys on CPU, the ring's per-step math) against the dense reference
(kernels.reference), forward and dQ/dK/dV: every mask family (packing, image/video/audio spans, padding, permuted
tokens), sliding windows, softcap, span isolation, GQA, q and k of different lengths, rows that attend nothing; the
tiles it computes against the exact count of non-empty tiles; its memory against the S x S a dense path needs; its
lse interface; a whole LLM on the tiled path against the dense one; and on 8 devices with the batch and heads sharded.

Every jitted function takes the metadata as traced arguments, so one compilation serves all families."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mllm_jax import kernels
from mllm_jax.kernels import TokenMeta
from mllm_jax.kernels.tiled import (
    tiled_attention,
    tiled_attention_bwd_block,
    tiled_attention_fwd_block,
    tiled_attention_with_count,
    tiled_attention_with_lse,
)
from mllm_jax.kernels.dispatch import DENSE_MAX_KEYS, TILED_MIN_KEYS
from mllm_jax.kernels.meta import SKIP, dense_block_map
from mllm_jax.kernels.reference import reference_attention
from kernel_testlib import random_inputs, value_and_grads as _value_and_grads
from mask_families import all_cases, cases_with_permutations, make_meta, permute, take_tokens

B, S, HQ, HKV, D = 2, 100, 2, 1, 64  # S is not a multiple of the blocks; GQA with 2 query heads per kv head
BLOCKS = dict(block_q=16, block_k=32)
OPTIONS = [dict(), dict(window=9, softcap=5.0), dict(span_isolated=True)]


def _inputs(b=B, sq=S, sk=S, hq=HQ, hkv=HKV, d=D, dtype=jnp.float32, seed=0):
    return random_inputs(b, sq, sk, hq, hkv, d, dtype, seed)


def _tiled(q, k, v, qm, km, **kw):
    return tiled_attention(q, k, v, qm, km, **BLOCKS, **kw)


def _assert_close(got, want, atol, rtol, what):
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert not jnp.isnan(g).any(), f"{what}: NaN in {name}"
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), atol=atol, rtol=rtol,
                                   err_msg=f"{what}: {name}")


def _cases():
    """(name, q_meta, k_meta, k_index): all families, plus q and k permuted independently of each other."""
    return cases_with_permutations(B, S)


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(o) or "plain")
def test_forward_and_grads_match_reference(opts):
    q, k, v, d_out = _inputs()
    key = tuple(sorted(opts.items()))
    for name, qm, km, k_index in _cases():
        kk, vv = (k, v) if k_index is None else (take_tokens(k, k_index), take_tokens(v, k_index))
        args = (q, kk, vv, qm, km, d_out)
        want = _value_and_grads(reference_attention, key)(*args)
        got = _value_and_grads(_tiled, key)(*args)
        _assert_close(got, want, 1e-4, 1e-4, f"{name} {opts}")


def test_bf16_matches_reference_within_bf16_rounding():
    # bf16 keeps 8 mantissa bits: one rounding is a relative error of 2**-8 ~ 4e-3. Inputs are rounded once and both
    # paths accumulate in f32, but the probabilities are rounded to bf16 before P @ V in different groupings (per tile
    # with a running max vs once per row), and outputs of magnitude ~1 are rounded to bf16 again: a few roundings of
    # 4e-3 each, so 3e-2 absolute on O(1) values. The gradients chain two such products (dP, then dS @ K): 6e-2.
    q, k, v, d_out = _inputs(dtype=jnp.bfloat16)
    for name, meta in all_cases(B, S, seed=1, pad=7)[1:3]:
        args = (q, k, v, meta, meta, d_out)
        want = _value_and_grads(reference_attention, ())(*(a.astype(jnp.float32) if a.dtype == jnp.bfloat16 else a
                                                            for a in args[:3]), *args[3:5],
                                                          d_out.astype(jnp.float32))
        got = _value_and_grads(_tiled, ())(*args)
        assert all(g.dtype == jnp.bfloat16 for g in got)
        np.testing.assert_allclose(np.asarray(got[0], np.float32), want[0], atol=3e-2, rtol=3e-2)
        for g, w in zip(got[1:], want[1:]):
            np.testing.assert_allclose(np.asarray(g, np.float32), w, atol=6e-2, rtol=6e-2)


def test_rows_that_see_nothing_give_zero_output_and_zero_grads():
    # q rows of a segment absent from k, and padding rows: output and dq exactly 0; no NaN anywhere.
    q, k, v, d_out = _inputs(b=1, sq=40, sk=48)
    seg_q = np.array([[1] * 10 + [3] * 20 + [0] * 10], np.int32)
    qm = TokenMeta(np.tile(np.arange(40, dtype=np.int32), (1, 1)), seg_q, np.zeros((1, 40), np.int32))
    km = TokenMeta(np.arange(48, dtype=np.int32)[None], np.array([[1] * 30 + [2] * 18], np.int32),
                   np.zeros((1, 48), np.int32))
    out, dq, dk, dv = _value_and_grads(_tiled, ())(q, k, v, qm, km, d_out)
    want = _value_and_grads(reference_attention, ())(q, k, v, qm, km, d_out)
    _assert_close((out, dq, dk, dv), want, 1e-4, 1e-4, "empty rows")
    assert np.all(np.asarray(out)[0, 10:] == 0) and np.all(np.asarray(dq)[0, 10:] == 0)
    assert np.all(np.asarray(dk)[0, 30:] == 0), "keys of segment 2 are seen by nobody"
    assert np.all(np.asarray(dv)[0, 30:] == 0)
    # Nothing at all to attend (every key is padding).
    km0 = TokenMeta(km.positions, np.zeros_like(km.segment_ids), km.span_ids)
    got = _value_and_grads(_tiled, ())(q, k, v, qm, km0, d_out)
    for g in got:
        assert np.all(np.asarray(g) == 0)


def test_computes_exactly_the_nonempty_tiles():
    # The count is taken inside the loop body, so it is what the implementation iterated over.
    q, k, v, _ = _inputs(b=2, sq=256, sk=256, hq=1, hkv=1, d=16)
    count = jax.jit(lambda q, k, v, m: tiled_attention_with_count(q, k, v, m, m, block_q=32, block_k=32)[1])
    for name, meta in all_cases(2, 256, seed=6)[:-1]:  # ordered families: the block map is exact there
        exact = dense_block_map(meta, meta, 32, 32)
        nonempty = int((exact != SKIP).sum())
        assert int(count(q, k, v, meta)) == nonempty, name
        if name != "permuted":
            assert nonempty < exact.size, f"{name}: the family should have empty tiles to skip"


def test_long_sequence_never_materialises_s_by_s():
    # The compiled forward+backward's temporaries stay far below one [S, S] f32 array (a dense path needs several).
    s = 4096
    q, k, v, d_out = _inputs(b=1, sq=s, sk=s, hq=1, hkv=1, d=16)
    meta = TokenMeta.causal(1, s)
    f = _value_and_grads(tiled_attention, ())
    mem = f.lower(q, k, v, meta, meta, d_out).compile().memory_analysis()
    assert mem.temp_size_in_bytes < s * s * 4 / 8, mem.temp_size_in_bytes


def test_dispatch_xla_uses_tiled_for_long_keys():
    s = kernels.dispatch.DENSE_MAX_KEYS + 40
    q, k, v, _ = _inputs(b=1, sq=64, sk=s, hq=2, hkv=2, d=16)
    meta_k = make_meta("llava", 1, s, seed=0)
    meta_q = TokenMeta(*(a[:, -64:] for a in meta_k))  # the last 64 queries against every key
    xla = jax.jit(lambda *a: kernels.attention(*a, impl="xla"))(q, k, v, meta_q, meta_k)
    ref = jax.jit(lambda *a: reference_attention(*a))(q, k, v, meta_q, meta_k)
    blk = jax.jit(lambda *a: tiled_attention(*a))(q, k, v, meta_q, meta_k)
    np.testing.assert_allclose(xla, ref, atol=1e-4, rtol=1e-4)
    np.testing.assert_array_equal(xla, blk)  # it is the tiled path, bit for bit


def _dense_out_and_lse(q, k, v, qm, km, *, scale=None, window=None, softcap=None, span_isolated=False):
    """The oracle for the lse: dense masked logits, jax.nn.logsumexp per row (-inf for rows that see nothing)."""
    b, sq, hq, d = q.shape
    hkv = k.shape[2]
    scale = d**-0.5 if scale is None else scale
    s = jnp.einsum("bqhgd,bkhd->bhgqk", q.reshape(b, sq, hkv, hq // hkv, d), k) * scale
    if softcap is not None:
        s = softcap * jnp.tanh(s / softcap)
    m = kernels.mask(qm, km, window=window, span_isolated=span_isolated)[:, None, None]
    seen = m.any(-1)
    lse = jax.nn.logsumexp(jnp.where(m, s, -1e30), axis=-1)  # finite stand-in, so autodiff stays NaN-free
    lse = jnp.where(seen, lse, -jnp.inf).reshape(b, hq, sq)
    out = reference_attention(q, k, v, qm, km, scale=scale, window=window, softcap=softcap,
                              span_isolated=span_isolated)
    return out, lse


@functools.lru_cache(maxsize=None)
def _lse_value_and_grads(impl, opts):
    """jit -> (out, lse, dq, dk, dv) of loss = sum(out * d_out) + sum(lse * d_lse) over rows that see something."""
    kw = dict(opts)

    def f(q, k, v, qm, km, d_out, d_lse):
        def loss(q, k, v):
            out, lse = impl(q, k, v, qm, km, **kw)
            return jnp.sum(out * d_out) + jnp.sum(jnp.where(jnp.isfinite(lse), lse * d_lse, 0.0)), (out, lse)

        (_, (out, lse)), grads = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(q, k, v)
        return (out, lse, *grads)

    return jax.jit(f)


@pytest.mark.parametrize("opts", OPTIONS[:2], ids=lambda o: ",".join(o) or "plain")
def test_with_lse_matches_dense_logsumexp_and_its_gradients(opts):
    # A cotangent on the lse must reach q and k (d lse / d s = p): the oracle is autodiff of the dense logsumexp.
    q, k, v, d_out = _inputs()
    d_lse = jax.random.normal(jax.random.PRNGKey(9), (B, HQ, S))
    key = tuple(sorted(opts.items()))
    blk = lambda *a, **kw: tiled_attention_with_lse(*a, **BLOCKS, **kw)  # noqa: E731
    for name, meta in [c for c in all_cases(B, S, seed=1, pad=7) if c[0] in ("packed", "interleaved")]:
        args = (q, k, v, meta, meta, d_out, d_lse)
        want = _lse_value_and_grads(_dense_out_and_lse, key)(*args)
        got = _lse_value_and_grads(blk, key)(*args)
        assert got[1].shape == (B, HQ, S) and got[1].dtype == jnp.float32
        pad = ~np.asarray(meta.segment_ids != 0)[:, None, :].repeat(HQ, 1)
        assert np.all(np.asarray(got[1])[pad] == -np.inf), f"{name}: padding rows must have lse = -inf"
        for what, g, w in zip(("out", "lse", "dq", "dk", "dv"), got, want):
            np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4, err_msg=f"{name} {opts} {what}")


def test_fwd_and_bwd_blocks_over_key_shards_sum_to_the_whole():
    # Split the keys (in a permuted order) into 3 shards as a ring would see them: merging the per-shard forwards by
    # their lse and summing the per-shard backwards taken with the merged lse must give attention over all the keys.
    q, k, v, d_out = _inputs(sq=96, sk=96)
    qm = make_meta("audio_image", B, 96, seed=2, pad=5)
    km_all, k_index = permute(qm, seed=3)
    k, v = take_tokens(k, k_index), take_tokens(v, k_index)
    kw = dict(block_q=16, block_k=16, softcap=4.0)
    shards = [slice(0, 32), slice(32, 64), slice(64, 96)]

    @jax.jit
    def sharded(q, k, v, qm, km_all, d_out):
        sl = lambda m, s: TokenMeta(*(a[:, s] for a in m))  # noqa: E731
        outs = [tiled_attention_fwd_block(q, k[:, s], v[:, s], qm, sl(km_all, s), **kw) for s in shards]
        lse = jax.nn.logsumexp(jnp.stack([l for _, l in outs]), axis=0)
        weights = [jnp.where(jnp.isfinite(lse), jnp.exp(l - lse), 0.0) for _, l in outs]
        out = sum(o * jnp.transpose(w, (0, 2, 1))[..., None] for (o, _), w in zip(outs, weights))
        delta = jnp.transpose(jnp.sum(d_out * out, -1), (0, 2, 1))
        parts = [tiled_attention_bwd_block(q, k[:, s], v[:, s], qm, sl(km_all, s), d_out, lse, delta, **kw)
                 for s in shards]
        dk, dv = (jnp.concatenate([p[i] for p in parts], axis=1) for i in (1, 2))
        return out, sum(p[0] for p in parts), dk, dv

    want = _value_and_grads(reference_attention, (("softcap", 4.0),))(q, k, v, qm, km_all, d_out)
    out, dq, dk, dv = sharded(q, k, v, qm, km_all, d_out)
    _assert_close((out, dq, dk, dv), want, 1e-4, 1e-4, "sharded keys")


@pytest.mark.parametrize("bad", [dict(block_q=0), dict(block_k=12.5), dict(window=0), dict(softcap=-1.0)])
def test_bad_options_raise_value_error_naming_them(bad):
    q, k, v, _ = _inputs(b=1, sq=8, sk=8, hq=1, hkv=1, d=8)
    meta = TokenMeta.causal(1, 8)
    with pytest.raises(ValueError, match=next(iter(bad))):
        tiled_attention(q, k, v, meta, meta, **bad)


def test_benchmark_quick_smoke(tmp_path):
    # benchmarks/attention.py --quick runs every path of the benchmark at small sizes; its tile ratios must be exact
    # and its errors within fp32 tolerance (these are measured, not copied: a kernel computing an empty tile or a
    # wrong output fails here).
    import json
    import subprocess
    import sys

    out = tmp_path / "attention.json"
    root = __file__.rsplit("/tests/", 1)[0]
    # the TPU section at one size and without its Mosaic compiles (tests/test_kernels_pallas_tpu.py compiles them)
    proc = subprocess.run([sys.executable, f"{root}/benchmarks/attention.py", "--quick", "--tpu_sizes", "8192",
                           "--tpu_compile", "none", "--out", str(out)],
                          capture_output=True, text=True, cwd=root, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == result
    assert set(result["families"]) == {"causal", "llava", "interleaved", "video", "audio_image", "packed", "prefix_lm"}
    for name, fam in result["families"].items():
        assert fam["computed_over_nonempty"] and all(v == 1.0 for v in fam["computed_over_nonempty"].values()), name
        assert all(0 < v < 1 for v in fam["computed_over_dense"].values()), name  # every family skips some tiles
        assert all(e < 1e-4 for e in fam["max_abs_err"].values()), name
        assert result["xla_speedup_vs_dense"][name] > 0
    assert result["all_exact"] is True
    assert result["grid_equals_live_tiles"] is True and 0 < result["tpu_modelled_vs_splash_max"]


# ------------------------------------------------------------------- head-major shapes: GQA groups, cross lengths

CPU_OPTIONS = [dict(), dict(window=9, softcap=5.0), dict(span_isolated=True), dict(scale=0.3, softcap=2.0, window=30)]


def _close(got, want, what, atol=1e-4, rtol=1e-4):
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert g.shape == w.shape and g.dtype == w.dtype, f"{what}: {name} {g.shape} {g.dtype} vs {w.shape} {w.dtype}"
    _assert_close(got, want, atol, rtol, what)


def _tiled_small_blocks(q, k, v, qm, km, **kw):
    return tiled_attention(q, k, v, qm, km, **BLOCKS, **kw)


def _tiled_default_blocks(q, k, v, qm, km, **kw):
    return tiled_attention(q, k, v, qm, km, **kw)


@pytest.mark.parametrize("opts,hq,hkv", [(o, 4, 2) for o in CPU_OPTIONS] + [(CPU_OPTIONS[0], 2, 2),
                                                                            (CPU_OPTIONS[1], 3, 1)],
                         ids=lambda x: (",".join(x) or "plain") if isinstance(x, dict) else str(x))
def test_gqa_groups_match_reference(opts, hq, hkv):
    q, k, v, d_out = _inputs(hq=hq, hkv=hkv, d=16)
    key = tuple(sorted(opts.items()))
    for name, qm, km, k_index in _cases():
        kk, vv = (k, v) if k_index is None else (take_tokens(k, k_index), take_tokens(v, k_index))
        args = (q, kk, vv, qm, km, d_out)
        want = _value_and_grads(reference_attention, key)(*args)
        got = _value_and_grads(_tiled_small_blocks, key)(*args)
        _close(got, want, f"{name} {opts} hq={hq} hkv={hkv}")


def test_default_blocks_and_query_key_lengths_differ():
    # Default blocks (one tile when shorter than 128), and cross attention: 70 queries against 300 keys.
    q, k, v, d_out = _inputs(sq=70, sk=300, hq=4, hkv=1, d=16)
    qm = make_meta("packed", B, 70, seed=5, pad=3)
    km = make_meta("packed", B, 300, seed=6, pad=11)
    for impl in (_tiled_small_blocks, _tiled_default_blocks):
        got = _value_and_grads(impl, (("window", 40),))(q, k, v, qm, km, d_out)
        want = _value_and_grads(reference_attention, (("window", 40),))(q, k, v, qm, km, d_out)
        _close(got, want, f"cross {impl.__name__}")


def test_llm_on_the_tiled_path_matches_the_dense_path():
    # A whole decoder (GQA, sliding window on alternate layers, softcap) at TILED_MIN_KEYS tokens: loss and
    # gradients with attention_impl="auto" (tiled on CPU) equal those with "dense" (head-major dense).
    import dataclasses

    from flax import nnx

    from mllm_jax.config import RunSettings
    from mllm_jax.llm import LLM
    from model_testlib import TINY_LLM

    cfg = dataclasses.replace(TINY_LLM, sliding_window=60, sliding_window_pattern=2, attn_logit_softcap=5.0)
    s = TILED_MIN_KEYS
    assert kernels.choose("auto", s, "cpu") == "tiled" and kernels.choose("dense", s, "cpu") == "dense"
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


# ----------------------------------------------------------------------------------- dispatch: kernels.attention


@pytest.mark.parametrize("backend,impl,keys,want", [
    ("cpu", "auto", 1, "dense"),
    ("cpu", "auto", TILED_MIN_KEYS - 1, "dense"),
    ("cpu", "auto", TILED_MIN_KEYS, "tiled"),
    ("cpu", "auto", DENSE_MAX_KEYS, "tiled"),
    ("cpu", "auto", 8192, "tiled"),
    ("cpu", "xla", TILED_MIN_KEYS - 1, "dense"),
    ("cpu", "dense", 8192, "dense"),
    ("cpu", "tiled", 8, "tiled"),
    ("cpu", "pallas_tpu", 512, "pallas_tpu"),
    ("gpu", "auto", 8, "pallas_gpu"),
    ("cuda", "auto", 8192, "pallas_gpu"),
    ("tpu", "auto", 8, "pallas_tpu"),
    ("tpu", "xla", DENSE_MAX_KEYS, "dense"),
    ("tpu", "xla", DENSE_MAX_KEYS + 1, "tiled"),
    ("gpu", "xla", TILED_MIN_KEYS, "dense"),
])
def test_dispatch_picks_the_documented_implementation(backend, impl, keys, want):
    assert kernels.choose(impl, keys, backend) == want


def test_dispatch_refuses_bad_impl_and_shapes():
    q, k, v, _ = _inputs(b=1, sq=8, sk=8, hq=4, hkv=2, d=8)
    meta = TokenMeta.causal(1, 8)
    with pytest.raises(ValueError, match="'flash'"):
        kernels.attention(q, k, v, meta, meta, impl="flash")
    for s in (8, TILED_MIN_KEYS + 1):  # the dense and the tiled path refuse alike
        q, k, v, _ = _inputs(b=1, sq=s, sk=s, hq=4, hkv=2, d=8)
        meta = TokenMeta.causal(1, s)
        with pytest.raises(ValueError, match="multiple of key/value heads"):
            kernels.attention(q[:, :, :3], k, v, meta, meta)


def test_dispatch_dense_mask_and_tiled_paths_match_reference():
    # Through kernels.attention: the tiled path from TILED_MIN_KEYS keys; below, the dense head-major path with the
    # mask built inside or passed in (takes_mask: what the LLM precomputes once for all layers).
    kw = dict(window=50, softcap=4.0)
    for s in (TILED_MIN_KEYS - 56, TILED_MIN_KEYS + 13):
        q, k, v, d_out = _inputs(b=2, sq=s, sk=s, hq=4, hkv=2, d=16)
        meta = make_meta("packed", 2, s, seed=7, pad=40)
        want = _value_and_grads(reference_attention, tuple(sorted(kw.items())))(q, k, v, meta, meta, d_out)
        got = _value_and_grads(kernels.attention, tuple(sorted(kw.items())))(q, k, v, meta, meta, d_out)
        _close(got, want, f"attention at {s} keys")
        assert kernels.takes_mask("auto", s) == (s < TILED_MIN_KEYS)
        if kernels.takes_mask("auto", s):
            mask = kernels.mask(meta, meta, window=kw["window"])
            with_mask = functools.partial(kernels.attention, mask=mask)
            _close(_value_and_grads(with_mask, tuple(sorted(kw.items())))(q, k, v, meta, meta, d_out), want,
                   "precomputed mask")


# ------------------------------------------------------------------------------------ sharded over 8 CPU devices


def _mesh(data, tensor):
    from jax.sharding import AxisType

    return jax.make_mesh((data, tensor), ("data", "tensor"), axis_types=(AxisType.Explicit,) * 2,
                         devices=jax.devices()[:8])


@pytest.mark.parametrize("s", [TILED_MIN_KEYS + 5, 2048])  # 4096-token layouts: tests/test_train_long_sequences.py
def test_sharded_batch_and_heads_match_reference(s):
    # The tiled path's loops index the batch: on a mesh kernels.attention runs it per shard under shard_map (with a
    # sharded batch dynamic_slice over it used to fail: "out dim (1) is not divisible by mesh axes (2)"). Batch over
    # data, heads over tensor; values and gradients equal the dense reference on one device.
    from jax.sharding import NamedSharding, PartitionSpec as P

    q, k, v, d_out = _inputs(b=8, sq=s, sk=s, hq=4, hkv=2, d=8, seed=s)
    meta = make_meta("packed", 8, s, seed=9, pad=20)
    # The oracle one batch row at a time: [Hq, S, S] float32 arrays stay at 256 MiB at 4096 tokens.
    ref = _value_and_grads(reference_attention, (("softcap", 5.0),))
    row = lambda x, i: x[i:i + 1]  # noqa: E731
    rows = [ref(*(row(x, i) for x in (q, k, v)), *(TokenMeta(*(row(a, i) for a in meta)),) * 2, row(d_out, i))
            for i in range(8)]
    want = [jnp.concatenate(parts) for parts in zip(*rows)]
    tiled = functools.partial(kernels.attention, impl="xla", context_parallel=False)
    for data, tensor in ((4, 2), (8, 1)):
        mesh = _mesh(data, tensor)
        with jax.set_mesh(mesh):
            assert kernels.choose("xla", s) == "tiled"
            x_spec = P("data", None, "tensor" if tensor > 1 else None)
            put = lambda x, spec: jax.device_put(jnp.asarray(x), NamedSharding(mesh, spec))  # noqa: E731
            args = ([put(x, x_spec) for x in (q, k, v)] + [TokenMeta(*(put(a, P("data")) for a in meta))] * 2
                    + [put(d_out, x_spec)])
            got = _value_and_grads(tiled, (("softcap", 5.0),))(*args)
        _close(got, want, f"data={data} tensor={tensor} at {s} tokens")


def test_inside_shard_map_the_arrays_are_whole():
    # Manual axes: the local arrays are whole, so no nested shard_map; the tiled path runs on them directly.
    from jax.sharding import NamedSharding, PartitionSpec as P

    s = TILED_MIN_KEYS + 5
    q, k, v, d_out = _inputs(b=8, sq=s, sk=s, hq=4, hkv=2, d=8)
    meta = make_meta("packed", 8, s, seed=9, pad=20)
    want = _value_and_grads(reference_attention, ())(q, k, v, meta, meta, d_out)

    def per_shard(q, k, v, qm, km):
        def local(*a):
            assert kernels.sharding.sharded_mesh() is None
            return kernels.attention(*a)

        return jax.shard_map(local, in_specs=(P("data"),) * 5, out_specs=P("data"), check_vma=False)(q, k, v, qm, km)

    mesh = _mesh(4, 2)
    with jax.set_mesh(mesh):
        put = lambda x: jax.device_put(jnp.asarray(x), NamedSharding(mesh, P("data")))  # noqa: E731
        args = [put(x) for x in (q, k, v)] + [TokenMeta(*map(put, meta))] * 2 + [put(d_out)]
        _close(_value_and_grads(per_shard, ())(*args), want, "shard_map over the batch")
