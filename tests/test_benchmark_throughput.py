"""benchmarks/throughput.py and the CPU fast path it measures.

- kernels.reference.head_major_attention (the path kernels.attention takes on CPU for short keys) equals kernels.reference, forward
  and gradients, over packing, image spans, padding rows, windows, softcap and GQA;
- the benchmark's analytic FLOP count equals one made from the built model's own parameter shapes;
- a --quick run end to end: the final JSON has the keys the issue asks for, sane values, and transformers' LLaVA
  has the parameter count of our model (same architecture on both sides).
"""

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mllm_jax.kernels.meta import TokenMeta, mask as mask_rule
from mllm_jax import kernels
from mllm_jax.kernels.reference import head_major_attention, reference_attention
from subprocess_env import child_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _packed_meta(b, s):
    """Row 0: text, an image span, text, then a second packed sample, then padding; row 1: one sample, padding."""
    pos = np.zeros((b, s), np.int32)
    seg = np.zeros((b, s), np.int32)
    span = np.zeros((b, s), np.int32)
    pos[0, :20], seg[0, :20] = np.arange(20), 1
    span[0, 4:12] = 1
    pos[0, 20:28], seg[0, 20:28] = np.arange(8), 2
    pos[1, :25], seg[1, :25] = np.arange(25), 1
    span[1, 2:7] = 1
    return TokenMeta(*(jnp.asarray(a) for a in (pos, seg, span)))


@pytest.mark.parametrize("hkv,window,softcap,span_isolated", [
    (4, None, None, False), (2, None, None, False), (1, 6, 3.0, False), (2, None, None, True),
])
def test_head_major_attention_matches_reference(hkv, window, softcap, span_isolated):
    b, s, hq, d = 2, 32, 4, 8
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(b, s, hq, d)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(b, s, hkv, d)), jnp.float32) for _ in range(2))
    ct = jnp.asarray(rng.normal(size=(b, s, hq, d)), jnp.float32)
    meta = _packed_meta(b, s)
    kw = dict(window=window, span_isolated=span_isolated)
    m = mask_rule(meta, meta, **kw)
    assert not bool(jnp.all(jnp.any(m, -1))), "the case must include rows that attend nothing"

    def ours(q, k, v):
        return jnp.sum(head_major_attention(q, k, v, m, scale=0.3, softcap=softcap) * ct)

    def ref(q, k, v):
        return jnp.sum(reference_attention(q, k, v, meta, meta, scale=0.3, softcap=softcap, **kw) * ct)

    out = head_major_attention(q, k, v, m, scale=0.3, softcap=softcap)
    want = reference_attention(q, k, v, meta, meta, scale=0.3, softcap=softcap, **kw)
    np.testing.assert_allclose(out, want, atol=1e-5, rtol=1e-5)
    g_ours = jax.grad(ours, argnums=(0, 1, 2))(q, k, v)
    g_ref = jax.grad(ref, argnums=(0, 1, 2))(q, k, v)
    for a, e in zip(g_ours, g_ref):
        np.testing.assert_allclose(a, e, atol=1e-5, rtol=1e-5)
    # kernels.attention takes this path on CPU and builds the same mask itself when none is given
    via_attend = kernels.attention(q, k, v, meta, meta, scale=0.3, softcap=softcap, **kw)
    np.testing.assert_allclose(via_attend, want, atol=1e-5, rtol=1e-5)


def test_attend_refuses_bad_shapes_on_the_fast_path():
    meta = TokenMeta.causal(1, 8, xp=jnp)
    q = jnp.zeros((1, 8, 3, 4))
    k = jnp.zeros((1, 8, 2, 4))
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        kernels.attention(q, k, k, meta, meta)


def _throughput_module():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import throughput
    finally:
        sys.path.pop(0)
    return throughput


def test_model_flops_match_the_models_parameter_shapes():
    tp = _throughput_module()
    cfg = tp.load_config(True, "float32")
    from mllm_jax.multimodal import MultimodalModel

    model = nnx.eval_shape(lambda: MultimodalModel(cfg.model, rngs=nnx.Rngs(0)))
    flat = {"/".join(map(str, k)): v for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    # matmul parameters: every kernel (the token embedding is a gather, not a matmul)
    kernels_of = lambda prefix: sum(math.prod(v.shape) for k, v in flat.items()  # noqa: E731
                                    if k.startswith(prefix) and k.endswith("kernel"))
    b, s = cfg.data.batch_size, cfg.data.seq_len
    llm, enc = cfg.model.llm, cfg.model.encoders["vision"]
    attn = lambda n_layers, rows, t, width: 3 * n_layers * 4 * rows * t * t * width  # noqa: E731
    want_llm = 6 * kernels_of("llm/") * b * s + attn(llm.n_layers, b, s, llm.n_heads * llm.resolved_head_dim)
    t = enc.num_patches + 1
    layer_kernels = kernels_of("encoders/vision/layers/")
    patch_kernels = kernels_of("encoders/vision/patch_embed")
    want_enc = 6 * (layer_kernels * b * t + patch_kernels * b * enc.num_patches) + attn(enc.n_layers, b, t,
                                                                                         enc.d_model)
    want_proj = 6 * kernels_of("projectors/vision/") * b * enc.num_features
    got = tp.model_flops(cfg)
    assert got["llm"] == want_llm
    assert got["encoders/vision"] == want_enc
    assert got["projectors/vision"] == want_proj
    assert got["total"] == want_llm + want_enc + want_proj


def test_quick_run_reports_jax_and_torch(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    out = tmp_path / "throughput.json"
    env = child_env()  # one CPU device, as the benchmark states
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "throughput.py"), "--quick",
                           "--dtypes", "float32", "--out", str(out)], capture_output=True, text=True, env=env,
                          timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    assert json.loads(out.read_text()) == last
    for key in ("tokens_per_s", "torch_tokens_per_s", "speedup_vs_torch", "mfu_vs_matmul"):
        assert isinstance(last[key], float) and last[key] > 0, key
    r = last["per_dtype"]["float32"]
    assert r["tokens_per_step"] == r["batch"] * r["seq_len"]
    assert last["tokens_per_s"] == pytest.approx(r["tokens_per_step"] / r["jax_step_s"])
    assert last["speedup_vs_torch"] == pytest.approx(r["torch_step_s"] / r["jax_step_s"])
    best = max(r["jax_matmul_flops_per_s"], r["torch_matmul_flops_per_s"])
    assert r["jax_mfu_vs_best_matmul"] == pytest.approx(r["jax_model_flops_per_s"] / best)
    assert r["jax_mfu_vs_best_matmul"] <= r["jax_mfu_vs_matmul"] * (1 + 1e-9)
    assert "--xla_cpu_experimental_ynn_fusion_type=" in last["xla_flags"]  # train.py's CPU flags
    # The same architecture on both sides: parameter counts agree up to CLIP's extra LayerNorm and our patch bias.
    d_vision = 32
    assert r["torch_params"] - r["jax_trainable_params"] == 4 * d_vision - 2 * d_vision - d_vision
    # Both start from random weights on the same labels: the first loss is about log(vocab) on both sides.
    for side in ("jax", "torch"):
        assert abs(r[f"{side}_loss_first_last"][0] - math.log(128)) < 0.5, side
