"""--compile_only --target: the train step compiled by the target's own compiler (libtpu's XLA:TPU + Mosaic, the
deviceless CUDA back end + Triton), from a CPU machine. Skipped where libtpu / jax-cuda12-plugin are not installed.

vlm_tiny is shrunk (fewer layers, unrolled so one compile gives the cost figures) to keep each compile ~20-40 s.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from mllm_jax.train import compile_target as ct
from mllm_jax.train import loop, targets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_TPU = importlib.util.find_spec("libtpu") is not None
HAS_CUDA = importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
# Skipped only off CI: CI installs requirements-test.txt, where a missing compiler is a failure, never a skip.
ON_CI = bool(os.environ.get("CI"))
needs_tpu = pytest.mark.skipif(not HAS_TPU and not ON_CI, reason="libtpu not installed (requirements-test.txt)")
needs_cuda = pytest.mark.skipif(not HAS_CUDA and not ON_CI,
                                reason="jax-cuda12-plugin not installed (requirements-test.txt)")

LLM_LAYERS, VISION_LAYERS = 2, 1
SMALL = [f"LLMConfig.n_layers={LLM_LAYERS}", f"VisionConfig.n_layers={VISION_LAYERS}",
         'ModelConfig.layer_loop="unrolled"', 'ModelConfig.attention_impl="auto"']


def _cfg(*params):
    return loop.load_run_config([os.path.join(ROOT, "configs/vlm_tiny.gin")], SMALL + list(params))


def _check_sane(r: dict, target: str, devices: int, *, costs: bool = True):
    for key in ("target", "devices", "fits", "per_device_gib", "hbm_gib", "flops_per_device", "model_flops",
                "roofline_step_s", "mfu_bound", "pallas_calls", "collectives", "compile_s"):
        assert key in r, key
    assert r["target"] == target and r["devices"] == devices
    assert r["fits"] is True
    assert 0 < r["per_device_gib"] < r["hbm_gib"]
    assert r["model_flops"] > 0
    if costs:
        assert r["flops_per_device"] > 0 and r["roofline_step_s"] > 0 and 0 < r["mfu_bound"] <= 1.0
    else:  # the deviceless GPU back end has no cost analysis: said so, not zeros
        assert r["flops_per_device"] is None and r["roofline_step_s"] is None and "no cost analysis" in r["cost_basis"]
    assert r["memory_gib"]["parameters"] > 0 and r["memory_gib"]["optimizer_state"] > 0
    assert set(r["collectives"]) == set(ct.COLLECTIVE_KINDS)
    json.dumps(ct.summary_json(r))  # the last line's object is JSON


# ------------------------------------------------------------------------------------------------ parsing targets


def test_target_names():
    cases = {"tpu:v5p:4x4x4": ("v5p", (4, 4, 4)), "tpu:v5p-128": ("v5p", (4, 4, 4)), "tpu:v5p-8": ("v5p", (2, 2, 1)),
             "tpu:v5litepod-256": ("v5e", (16, 16)), "tpu:v5e:2x2": ("v5e", (2, 2)), "tpu:v6e-16": ("v6e", (4, 4)),
             "tpu:v4-16": ("v4", (2, 2, 2)), "gpu:h100:2x8": ("h100", (2, 8)), "gpu:a100:1x8": ("a100", (1, 8)),
             "gpu:h200:1x8": ("h200", (1, 8))}
    for text, (chip, shape) in cases.items():
        t = targets.parse(text)
        assert (t.chip.name, t.shape) == (chip, shape), text
    assert targets.parse("tpu:v5p-128").num_devices == 64
    assert targets.parse("gpu:h100:2x8").attention_impl == "pallas_gpu"
    assert targets.parse("tpu:v6e:4x4").attention_impl == "pallas_tpu"


@needs_tpu
@pytest.mark.parametrize("text", ["tpu:v4:2x2x1", "tpu:v4-16", "tpu:v5p:2x2x1", "tpu:v5e:2x4", "tpu:v6e:1x1"])
def test_tpu_target_has_one_device_per_chip(text):
    # As jax sees the hardware: v4 and v5p run their two TensorCores as one megacore device (libtpu's default
    # description of v4 had a device per core, 8 on a 2x2x1 slice, and every v4 compile was refused).
    t = targets.parse(text)
    devices = t.devices()
    assert len(devices) == t.num_devices == math.prod(t.shape)
    assert len({tuple(d.coords) for d in devices}) == len(devices), [d.coords for d in devices]


@pytest.mark.parametrize("text", ["tpu:v9:2x2", "gpu:rtx4090:1x1", "cpu:8", "tpu:v5p:4x4", "tpu:v5p-12", ""])
def test_unknown_target_lists_known(text):
    with pytest.raises(targets.UnknownTargetError) as e:
        targets.parse(text)
    assert repr(text) in str(e.value) and "tpu:v5p:4x4x4" in str(e.value) and "gpu:h100:2x8" in str(e.value)


def test_cli_refuses_unknown_target():
    p = subprocess.run([sys.executable, "train.py", "--gin_file=configs/vlm_tiny.gin", "--compile_only",
                        "--target=tpu:v7x:2x2"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode != 0
    assert "'tpu:v7x:2x2'" in p.stderr and "tpu:v5e:2x2" in p.stderr and "gpu:h100:2x8" in p.stderr


def test_batch_shapes_follow_the_context_plan():
    cfg = _cfg("ParallelConfig.context=4", "ParallelConfig.microbatches=2", "DataConfig.seq_len=300",
               "LLMConfig.max_position_embeddings=1024")
    b = ct.batch_shapes(cfg)
    # 300 tokens in 128-token blocks over 4 ranks: padded to 4 x 128 = 512
    assert b["input_ids"].shape == (2, 8, 512) and b["feature_index"]["vision"].shape == (2, 8, 512)
    assert b["encoder_inputs"]["vision"].shape == (2, 8 * 8, 36, 36, 3)


@pytest.mark.parametrize("target, params", [
    # pallas_tpu's 512 x 1024 tile: block 1024, 31868 -> 32768 (this CPU host's kernels.tiled 128 x 128: 32256)
    ("tpu:v5e:2x2", ["DataConfig.seq_len=31868"]),
    ("tpu:v5p:2x2x1", ["DataConfig.seq_len=3000", 'ContextConfig.mode="zigzag"']),
    ("gpu:h100:1x4", ["DataConfig.seq_len=3000", 'ContextConfig.attention="ring"']),
    (None, ["DataConfig.seq_len=300"]),  # this host: 300 -> 320 (blocks of 16), not 512 (blocks of 128)
])
def test_auto_block_padded_length_is_the_host_permutations(target, params):
    """ContextConfig.block = "auto": the padded length a compile for the target derives (for_target, then
    batch_shapes' context_length) is the length the run's hosts get from permute_for_context on that target's
    kernel (its platform and chip), on a batch of the run's sequence length."""
    from mllm_jax.data.context_batches import permute_for_context
    from mllm_jax.kernels.meta import TokenMeta

    raw = _cfg("ParallelConfig.context=4", 'ContextConfig.block="auto"', "LLMConfig.max_position_embeddings=32768",
               *params)
    cfg, where = raw, dict(attention_impl=raw.model.attention_impl)
    if target is not None:
        t = targets.parse(target)
        cfg = ct.for_target(raw, t)
        where = dict(attention_impl=t.attention_impl, backend=t.platform, generation=t.chip.name)
        assert isinstance(cfg.parallel.context_config.block, int)
    meta = TokenMeta.causal(1, cfg.data.seq_len)
    batch = {"input_ids": np.ones_like(meta.positions), "labels": np.ones_like(meta.positions),
             "positions": meta.positions, "segment_ids": meta.segment_ids, "span_ids": meta.span_ids}
    out, _ = permute_for_context(batch, raw.parallel, leading=0, llm_config=cfg.model.llm, **where)
    assert ct.context_length(cfg) == ct.batch_shapes(cfg)["input_ids"].shape[-1] == out["input_ids"].shape[-1]
    if target == "tpu:v5e:2x2":  # resolved for the target's kernel, not this host's
        assert (out["input_ids"].shape[-1], ct.context_length(raw)) == (32768, 32256)
    if target is None:
        assert out["input_ids"].shape[-1] == 320
        from mllm_jax.train import dry_run  # --dry_run's activations: the padded shard's tokens

        assert dry_run.llm_tokens_per_device(raw) == raw.data.batch_size * 320 / 4


def test_collective_parser():
    hlo = ("  %all-reduce.1 = f32[16,4]{1,0} all-reduce(f32[16,4]{1,0} %x), replica_groups={}\n"
           "  %ag = (bf16[8]{0}, bf16[32]{0}) all-gather-start(bf16[8]{0} %y), dimensions={0}\n"
           "  %agd = bf16[32]{0} all-gather-done((bf16[8]{0}, bf16[32]{0}) %ag)\n"
           "  %cp = s32[2,2]{1,0} collective-permute(s32[2,2]{1,0} %z), source_target_pairs={{0,1}}\n")
    c = ct.collectives(hlo)
    assert c["all-reduce"] == {"count": 1, "bytes": 256.0}
    assert c["all-gather"]["count"] == 1 and c["collective-permute"] == {"count": 1, "bytes": 16.0}
    assert c["reduce-scatter"]["count"] == 0


# ------------------------------------------------------------------------------------------------ compiling


@needs_tpu
def test_vlm_tiny_compiles_for_tpu_with_pallas():
    """One chip (v5e 1x1): the Mosaic kernels in the program, counted."""
    r = ct.compile_for_target(_cfg(), targets.parse("tpu:v5e:1x1"))
    _check_sane(r, "tpu:v5e:1x1", 1)
    assert r["attention_impl"] == "pallas_tpu"
    assert r["pallas_calls"] == sum(r["pallas_kernels"].values())
    # Every attention layer (LLM and ViT, unrolled) has its backward's dQ kernel once; forward and dK/dV at least once.
    layers = LLM_LAYERS + VISION_LAYERS
    assert r["pallas_kernels"].get("mllm_flash_dq") == layers, r["pallas_kernels"]
    assert r["pallas_kernels"].get("mllm_flash_fwd", 0) >= layers and r["pallas_kernels"].get("mllm_flash_dkv", 0) >= layers


@needs_tpu
def test_vlm_tiny_compiles_for_tpu_with_xla_attention_on_data_parallel():
    r = ct.compile_for_target(_cfg("ParallelConfig.data=4", 'ModelConfig.attention_impl="xla"'),
                              targets.parse("tpu:v5e:2x2"))
    _check_sane(r, "tpu:v5e:2x2", 4)
    assert r["pallas_calls"] == 0
    assert r["collectives"]["all-reduce"]["count"] > 0  # gradients over data


@needs_cuda
def test_vlm_tiny_compiles_for_gpu_with_pallas():
    r = ct.compile_for_target(_cfg(), targets.parse("gpu:h100:1x1"))
    _check_sane(r, "gpu:h100:1x1", 1, costs=False)
    assert r["attention_impl"] == "pallas_gpu"
    # Every attention layer (LLM and ViT, unrolled): one forward, one dQ and one dK/dV Triton kernel.
    layers = LLM_LAYERS + VISION_LAYERS
    assert r["pallas_calls"] == 3 * layers, r["pallas_kernels"]


@needs_tpu
def test_too_large_for_hbm_is_reported_naming_the_figure():
    p = subprocess.run([sys.executable, "train.py", "--gin_file=configs/vlm_tiny.gin", "--compile_only",
                        "--target=tpu:v5e:2x2"] + [f"--gin_param={g}" for g in SMALL] +
                       ["--gin_param=ParallelConfig.data=4", '--gin_param=ModelConfig.attention_impl="xla"',
                        "--gin_param=DataConfig.batch_size=4096", "--gin_param=LLMConfig.d_ff=4096"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 1, p.stderr[-2000:]
    assert "tpu:v5e:2x2" in p.stderr and "GiB" in p.stderr and "16.0" in p.stderr, p.stderr[-2000:]
    last = json.loads(p.stdout.strip().splitlines()[-1])
    assert last["fits"] is False and last["target"] == "tpu:v5e:2x2"


@needs_tpu
def test_broken_mosaic_kernel_is_rejected_by_the_same_compile_path():
    """A kernel Mosaic cannot lay out (a (1024,) -> (16, 64) reshape) lowers fine and must fail at compile."""
    import jax
    import jax.numpy as jnp
    from jax.experimental import pallas as pl
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    def kernel(x_ref, o_ref):
        o_ref[...] = jnp.reshape(x_ref[...], (16, 64)) * 2.0

    def per_device(x):
        return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((16, 64), jnp.float32))(x[0])[None]

    target = targets.parse("tpu:v5e:2x2")
    mesh = jax.sharding.Mesh(np.asarray(target.devices()), ("data",))
    fn = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=P("data"), out_specs=P("data"), check_vma=False))
    x = jax.ShapeDtypeStruct((4, 1024), jnp.float32, sharding=NamedSharding(mesh, P("data")))
    with pytest.raises(ct.TargetCompileError) as e:
        ct.compile_on_target(fn, (x,), mesh, what="tpu:v5e:2x2 broken kernel")
    assert "tpu:v5e:2x2" in str(e.value) and "Mosaic" in str(e.value)


@needs_tpu
@pytest.mark.parametrize("layer_loop", ["scan", "unrolled"])
def test_remat_recompute_survives_the_tpu_compiler(layer_loop):
    """The cost figures come from an unrolled copy of the step, and users may train unrolled: remat must still
    recompute there. Oracle: a layer tanh(h @ w) @ w2 under full remat recomputes exactly one matmul per layer in
    the backward (the h @ w that dw2 needs), so XLA:TPU's compiled FLOPs grow by one [b, d] x [d, d] matmul per
    layer over no remat, and dots remat (matmul outputs saved) recomputes none. Without the CSE barriers in the
    unrolled loop the TPU compiler merged the recompute into the forward and full == none (remat saved nothing)."""
    import jax
    import jax.numpy as jnp

    from kernel_testlib import compile_on_one_device
    from mllm_jax import layers as L

    n, d, b = 3, 512, 256
    stack = {k: jax.ShapeDtypeStruct((n, d, d), jnp.float32) for k in ("w", "w2")}
    h = jax.ShapeDtypeStruct((b, d), jnp.float32)

    def flops(remat):
        f = jax.grad(lambda s, h: jnp.sum(
            L.scan_layers(lambda p, x: jnp.tanh(x @ p["w"]) @ p["w2"], h, s, remat, layer_loop) ** 2))
        ca = compile_on_one_device("tpu:v5e:1x1", f, stack, h)[0].cost_analysis()
        return (ca[0] if isinstance(ca, list) else ca)["flops"]

    one_matmul = 2 * b * d * d
    base = flops("none")
    # scan: XLA:TPU's cost analysis counts a while loop's body once, so the extra is one matmul, not n
    extra = one_matmul * (n if layer_loop == "unrolled" else 1)
    assert flops("full") - base == pytest.approx(extra, rel=0.02)
    assert abs(flops("dots") - base) < 0.02 * one_matmul


def test_model_flops_of_llava_7b_are_the_closed_form():
    """mfu_bound's numerator. Oracle: the MFU convention for Llama-2-7B on 128 rows of 2048 tokens, 6 x matmul
    parameters x tokens (32 layers of 4 d^2 + 3 d d_ff, and the [d, V] head) plus the causal attention, 12 FLOPs
    per head dim per (query, key) pair forward and backward. A dense LLM must not count MoE top-k (a default of
    LLMConfig.experts_per_token once doubled its MLP FLOPs here)."""
    cfg = loop.load_run_config([os.path.join(ROOT, "configs/llava_7b.gin")])
    d, dff, layers, vocab, s, rows = 4096, 11008, 32, 32000, 2048, 128
    matmul_params = layers * (4 * d * d + 3 * d * dff) + d * vocab
    attention = rows * s * (s + 1) // 2 * 12 * d * layers
    assert ct.model_flops(cfg)["parts"]["llm"] == pytest.approx(6 * matmul_params * rows * s + attention, rel=1e-3)


@needs_tpu
def test_attention_choice_follows_the_target_not_the_host():
    """Compiling on a CPU host for a TPU target: kernels.choose answers for the devices of the mesh being traced for
    (impl "xla" runs dense up to DENSE_MAX_KEYS off CPU, tiled from TILED_MIN_KEYS on CPU; "auto" is the target's
    kernel), so the compiled program is the one the target would run."""
    import jax

    from mllm_jax import kernels
    from mllm_jax.kernels import dispatch

    keys = dispatch.TILED_MIN_KEYS * 2
    assert keys <= dispatch.DENSE_MAX_KEYS
    assert kernels.choose("xla", keys) == "tiled"  # the host: CPU
    mesh = jax.make_mesh((1,), ("x",), devices=targets.parse("tpu:v5e:1x1").devices())
    with jax.set_mesh(mesh):
        assert kernels.choose("xla", keys) == "dense"
        assert kernels.choose("auto", keys) == "pallas_tpu"


@pytest.mark.parametrize("text, d, tile", [
    ("tpu:v5e:1x1", 128, (512, 1024)), ("tpu:v6e:1x1", 128, (1024, 1024)), ("tpu:v5p:1x1x1", 256, (512, 512)),
    ("tpu:v4:1x1x1", 128, (512, 1024)), ("gpu:a100:1x1", 128, (128, 64)), ("gpu:h100:1x1", 128, (64, 128)),
    ("gpu:h200:1x1", 256, (64, 32))])
def test_kernel_blocks_follow_the_target_generation_not_the_host(text, d, tile):
    """Compiling on a CPU host for a target: the kernel's blocks are its generation's table entry (a v6e compile
    used v5e's blocks, an A100 one H100's, before the kernels read the traced mesh's device kind)."""
    import jax

    from mllm_jax.kernels import pallas_gpu, pallas_tpu
    from mllm_jax.kernels.dispatch import kernel_tile

    target = targets.parse(text)
    if (target.platform == "tpu" and not (HAS_TPU or ON_CI)) or (target.platform == "gpu" and not (HAS_CUDA or ON_CI)):
        pytest.skip(f"no compiler for {target.platform} (requirements-test.txt)")
    keys = 1 << 15
    assert targets.local_chip() is None  # the host is a CPU
    with jax.set_mesh(jax.make_mesh((1,), ("x",), devices=target.devices())):
        assert targets.local_chip() is target.chip
        generation = pallas_tpu.tpu_generation() if target.platform == "tpu" else pallas_gpu.gpu_generation()
        assert generation == target.chip.name
        assert kernel_tile("auto", keys, keys, d) == tile
        assert kernel_tile("auto", keys, keys, d, backend=target.platform, generation=target.chip.name) == tile


@needs_tpu
def test_nocompile_costs_skips_the_unrolled_copy(capsys):
    # train.py --compile_only --nocompile_costs: the step (scanned layers: the cost figures would need an unrolled
    # copy, which for a 7B model takes more host memory than the step) compiles and fits; no cost figures.
    from tests.train_main import main_status

    params = ["LLMConfig.n_layers=2", "VisionConfig.n_layers=1", 'ModelConfig.layer_loop="scan"',
              'ModelConfig.attention_impl="xla"']
    assert main_status(params, flags=("--compile_only", "--target=tpu:v5e:1x1", "--nocompile_costs")) == 0
    out = capsys.readouterr().out
    last = json.loads(out.strip().splitlines()[-1])
    assert last["fits"] is True and last["cost_basis"] == "not computed" and last["roofline_step_s"] is None, last
    assert "unrolled copy" not in out
