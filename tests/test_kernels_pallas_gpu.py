"""kernels.pallas_gpu (Triton) in interpret mode against the dense reference, forward and dQ/dK/dV, over the mask
families; its in-kernel tile count against the exact non-empty tiles; and its compile through Triton for an H100 (forward
and backward) by the deviceless CUDA back end on this CPU machine."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mllm_jax import kernels
from mllm_jax.kernels import TokenMeta
from mllm_jax.kernels.meta import SKIP, dense_block_map
from mllm_jax.kernels.pallas_gpu import flash_attention, flash_attention_with_count
from mllm_jax.kernels.reference import reference_attention
from kernel_testlib import compile_on_one_device
from mask_families import all_cases, make_meta
from test_kernels_tiled import B, S, _assert_close, _cases, _inputs, _value_and_grads, take_tokens

BLOCKS = dict(block_q=16, block_k=32)


def _pallas(q, k, v, qm, km, **kw):
    return flash_attention(q, k, v, qm, km, interpret=True, **BLOCKS, **kw)


@pytest.mark.parametrize("opts", [dict(), dict(window=9, softcap=5.0), dict(span_isolated=True)],
                         ids=["plain", "window,softcap", "span_isolated"])
def test_forward_and_grads_match_reference(opts):
    q, k, v, d_out = _inputs()
    key = tuple(sorted(opts.items()))
    # Interpret mode is slow: the options run on the families that mix most tile kinds, plus both permutations.
    cases = _cases() if not opts else [c for c in _cases() if c[0] in ("video", "packed", "q_and_k_permuted")]
    for name, qm, km, k_index in cases:
        kk, vv = (k, v) if k_index is None else (take_tokens(k, k_index), take_tokens(v, k_index))
        args = (q, kk, vv, qm, km, d_out)
        want = _value_and_grads(reference_attention, key)(*args)
        got = _value_and_grads(_pallas, key)(*args)
        _assert_close(got, want, 1e-4, 1e-4, f"{name} {opts}")


def test_bf16_gqa_head_dim_128():
    # bf16 keeps 8 mantissa bits (relative rounding 2**-8 ~ 4e-3). Both paths accumulate in f32 from the same bf16
    # inputs; they differ in where probabilities are rounded to bf16 before P @ V (per tile against a running max
    # here, once per row there) and outputs of size ~1 are rounded to bf16 once more: a few 4e-3 roundings, hence
    # 3e-2. Gradients chain two such bf16 products (dP = dO V^T, then dS K): 6e-2.
    q, k, v, d_out = _inputs(b=1, sq=80, sk=80, hq=4, hkv=2, d=128, dtype=jnp.bfloat16)
    meta = make_meta("video", 1, 80, seed=4, pad=3)
    got = _value_and_grads(_pallas, ())(q, k, v, meta, meta, d_out)
    f32 = [a.astype(jnp.float32) for a in (q, k, v, d_out)]
    want = _value_and_grads(reference_attention, ())(*f32[:3], meta, meta, f32[3])
    assert all(g.dtype == jnp.bfloat16 for g in got)
    np.testing.assert_allclose(np.asarray(got[0], np.float32), want[0], atol=3e-2, rtol=3e-2)
    for g, w in zip(got[1:], want[1:]):
        np.testing.assert_allclose(np.asarray(g, np.float32), w, atol=6e-2, rtol=6e-2)


def test_head_dim_256_and_default_blocks():
    q, k, v, d_out = _inputs(b=1, sq=40, sk=40, hq=2, hkv=1, d=256)
    meta = make_meta("llava", 1, 40, seed=0)
    pallas_default = lambda *a, **kw: flash_attention(*a, interpret=True, **kw)  # noqa: E731
    got = _value_and_grads(pallas_default, ())(q, k, v, meta, meta, d_out)
    want = _value_and_grads(reference_attention, ())(q, k, v, meta, meta, d_out)
    _assert_close(got, want, 1e-4, 1e-4, "head dim 256")


def test_rows_that_see_nothing_give_zero_output_and_zero_grads():
    q, k, v, d_out = _inputs(b=1, sq=40, sk=48)
    qm = TokenMeta(np.arange(40, dtype=np.int32)[None], np.array([[1] * 10 + [3] * 20 + [0] * 10], np.int32),
                   np.zeros((1, 40), np.int32))
    km = TokenMeta(np.arange(48, dtype=np.int32)[None], np.array([[1] * 30 + [2] * 18], np.int32),
                   np.zeros((1, 48), np.int32))
    got = _value_and_grads(_pallas, ())(q, k, v, qm, km, d_out)
    want = _value_and_grads(reference_attention, ())(q, k, v, qm, km, d_out)
    _assert_close(got, want, 1e-4, 1e-4, "empty rows")
    assert np.all(np.asarray(got[0])[0, 10:] == 0) and np.all(np.asarray(got[1])[0, 10:] == 0)


def test_kernel_computes_exactly_the_nonempty_tiles():
    q, k, v, _ = _inputs(b=2, sq=256, sk=256, hq=2, hkv=1, d=16)
    count = jax.jit(lambda q, k, v, m: flash_attention_with_count(q, k, v, m, m, block_q=32, block_k=32,
                                                                  interpret=True)[1])
    for name, meta in all_cases(2, 256, seed=6)[:-1]:
        nonempty = (dense_block_map(meta, meta, 32, 32) != SKIP).sum(axis=(1, 2))  # per batch row
        n = np.asarray(count(q, k, v, meta))  # [B, Hq], counted inside the kernel's tile loop
        np.testing.assert_array_equal(n, np.repeat(nonempty[:, None], 2, axis=1), err_msg=name)


def test_dispatch_pallas_gpu_in_interpret_mode():
    q, k, v, _ = _inputs(b=1, sq=48, sk=48, hq=2, hkv=2, d=64)
    meta = make_meta("prefix_lm", 1, 48, seed=2)
    out = kernels.attention(q, k, v, meta, meta, impl="pallas_gpu", interpret=True)
    np.testing.assert_allclose(out, reference_attention(q, k, v, meta, meta), atol=1e-4, rtol=1e-4)


def test_compiles_with_triton_for_h100_forward_and_backward():
    """The deviceless CUDA back end (jax-cuda12-plugin, an H100 target description) compiles the kernels through
    Triton to PTX (docs/compile.md: what runs without a device)."""
    b, s, hq, hkv, d = 1, 200, 4, 2, 128  # GQA, bf16, head dim 128, length not a multiple of the block
    meta = make_meta("interleaved", b, s)
    meta = TokenMeta(*(jax.ShapeDtypeStruct(np.shape(a), jnp.int32) for a in meta))
    spec = lambda h: jax.ShapeDtypeStruct((b, s, h, d), jnp.bfloat16)  # noqa: E731

    def f(q, k, v, m):
        return flash_attention(q, k, v, m, m, softcap=30.0)

    grad = jax.grad(lambda q, k, v, m: f(q, k, v, m).astype(jnp.float32).sum(), argnums=(0, 1, 2))
    for fn, n_kernels in ((f, 1), (grad, 3)):  # backward: the forward for residuals, then dQ and dK/dV
        _, text = compile_on_one_device("gpu:h100:1x1", fn, spec(hq), spec(hkv), spec(hkv), meta)
        assert text.count('custom_call_target="__gpu$xla.gpu.triton"') == n_kernels, text.count("triton")


@pytest.mark.parametrize("bad", [dict(block_q=24), dict(block_k=8), dict(window=-2), dict(softcap=0.0)])
def test_bad_options_raise_value_error_naming_them(bad):
    q, k, v, _ = _inputs(b=1, sq=8, sk=8, hq=1, hkv=1, d=16)
    meta = TokenMeta.causal(1, 8)
    with pytest.raises(ValueError, match=next(iter(bad))):
        flash_attention(q, k, v, meta, meta, interpret=True, **bad)


def _dkv_outputs(fn, *args):
    """The output avals of the dK/dV pallas_call in fn's jaxpr (the call with two same-shaped outputs: the forward's
    are the output and its lse, dQ's is one)."""
    from jax.extend.core import jaxprs_in_params

    found = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            outs = [v.aval for v in eqn.outvars]
            if eqn.primitive.name == "pallas_call" and len(outs) == 2 and outs[0].shape == outs[1].shape:
                found.append(outs)
            for sub in jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


def test_gqa_dkv_summed_in_kernel_group_of_three():
    """GQA with 3 query heads per kv head (not a power of two): dK/dV match the reference, and the dK/dV kernel
    writes [B, Sk, Hkv, D] in the input dtype directly (the group is summed in its f32 registers; no f32
    [B, Sk, Hq, D] per-query-head copies summed outside)."""
    q, k, v, d_out = _inputs(b=1, sq=64, sk=64, hq=6, hkv=2, d=32)
    meta = make_meta("interleaved", 1, 64, seed=5, pad=3)
    got = _value_and_grads(_pallas, ())(q, k, v, meta, meta, d_out)
    want = _value_and_grads(reference_attention, ())(q, k, v, meta, meta, d_out)
    _assert_close(got, want, 1e-4, 1e-4, "group of 3")
    grad = jax.grad(lambda q, k, v: jnp.sum(_pallas(q, k, v, meta, meta) * d_out), argnums=(0, 1, 2))
    (outs,) = _dkv_outputs(grad, q, k, v)
    assert [(o.shape, o.dtype) for o in outs] == [((1, 64, 2, 32), jnp.float32)] * 2, outs
    bf = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    (outs,) = _dkv_outputs(grad, *bf)
    assert all(o.dtype == jnp.bfloat16 and o.shape[2] == 2 for o in outs), outs


@pytest.mark.slow
def test_h100_block_table_entry_compiles_and_the_next_larger_is_refused():
    """GPU_BLOCKS was chosen by compiling candidates for the target: the H100 head-dim-128 entry (64 x 128) compiles
    forward and backward with 8 query heads per kv head, and the next larger candidate (128 x 64) is refused by the
    deviceless Triton compile for exceeding the H100's shared memory (the oracle the table was built from)."""
    from mllm_jax.kernels import pallas_gpu

    assert pallas_gpu.default_blocks(4096, 4096, 128, "h100") == (64, 128)
    b, s, hq, hkv, d = 1, 2048, 8, 1, 128
    meta = TokenMeta(*(jax.ShapeDtypeStruct((b, s), jnp.int32) for _ in range(3)))
    spec = lambda h: jax.ShapeDtypeStruct((b, s, h, d), jnp.bfloat16)  # noqa: E731

    def grad(bq, bk):
        return jax.grad(lambda q, k, v, m: flash_attention(q, k, v, m, m, block_q=bq, block_k=bk).astype(
            jnp.float32).sum(), argnums=(0, 1, 2))

    compile_on_one_device("gpu:h100:1x1", grad(64, 128), spec(hq), spec(hkv), spec(hkv), meta)
    with pytest.raises(Exception, match="Shared memory size limit exceeded"):
        compile_on_one_device("gpu:h100:1x1", grad(128, 64), spec(hq), spec(hkv), spec(hkv), meta)


def test_gpu_timing_script_smoke_runs_every_path_and_refuses_cpu_without_it(tmp_path, capsys):
    """benchmarks/attention_gpu.py (the GPU timing run, docs/kernels.md): without a GPU it refuses, naming the
    backend; --interpret_smoke runs every code path (our kernel and JAX's Pallas anchor in interpret mode, cuDNN's
    call with implementation="xla"; causal covers is_causal and the anchor's causal mask, packed the dense bias and
    segment ids) and our kernel's output matches kernels.reference; the model counts exactly the non-empty tiles."""
    from benchmarks import attention_gpu
    from mllm_jax.kernels.pallas_tpu import TILE_FLOPS
    from mllm_jax.train.targets import CHIPS

    out = tmp_path / "gpu.json"
    with pytest.raises(SystemExit, match="backend is 'cpu'"):
        attention_gpu.main(["--out", str(out), "--in_process"])
    assert not out.exists()
    got = attention_gpu.main(["--out", str(out), "--interpret_smoke", "--in_process", "--families", "causal,packed"])
    assert json.loads(out.read_text()) == json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    cfg, s = attention_gpu.SMOKE_RUN, attention_gpu.SMOKE_RUN["sizes"][0]
    assert got["interpret_smoke"] and got["backend"] == "cpu" and not got["partial"]
    for fam in ("causal", "packed"):
        for impl in attention_gpu.IMPLS:
            t = got["gpu_ms"][fam][f"{impl}@{s}"]
            assert isinstance(t, dict) and t["fwd"] > 0 and t["fwd_bwd"] > 0, (fam, impl, t)
        for key in ("measured_over_model", "speedup_vs_cudnn", "speedup_vs_pallas_anchor"):
            assert set(got[key][f"{fam}@{s}"]) == {"fwd", "fwd_bwd"}, (key, fam)
        err = got["max_abs_err"][f"{fam}@{s}"]
        assert err["ours_vs_reference"] < 1e-4 and err["ours_vs_cudnn"] < 1e-4, (fam, err)
        model = got["model_ms"][fam][str(s)]
        meta = make_meta(fam, 1, s, seed=s)
        bq, bk = cfg["blocks"]
        live = int((dense_block_map(meta, meta, bq, bk) != SKIP).sum())  # the brute-force count of non-empty tiles
        assert model["live_tiles_per_head"] == live, (fam, model)
        flops = sum(TILE_FLOPS.values()) * cfg["hq"] * live * bq * bk * cfg["head_dim"]
        np.testing.assert_allclose(model["flops_ms"], 1e3 * flops / CHIPS["h100"].peak_flops, rtol=1e-12)
    assert got["max_abs_err"][f"causal@{s}"]["anchor_vs_reference"] < 1e-4  # the anchor's causal mask is exact there
    assert "cudnn" not in got["mask_used"]["cudnn:causal"] and "is_causal" in got["mask_used"]["cudnn:causal"]
