"""The microbatch balancer on native-resolution workloads: samples priced from their instances' real patch grids
(benchmarks/microbatch_balance.py's variable_resolution family, mllm_jax.data.datasets.WorkloadModel); the context
planner's per-rank tiles against the tiles the context-parallel attention kernels count (benchmarks/cp_balance.py)."""

import numpy as np
import pytest

from benchmarks import _variable_resolution as varres
from benchmarks import microbatch_balance
from benchmarks.cp_balance import family_meta
from mllm_jax import costs
from mllm_jax.data.datasets import WorkloadModel


@pytest.fixture(scope="module")
def model():
    return WorkloadModel(varres.qwen25vl_7b())


def test_a_native_instance_costs_its_own_cost_chain(model):
    """Each instance is priced at its grid: the encoder layers at its patches (attention per temporal slice and
    window), frozen: forward only; then the trainable merger: forward and its weight gradient (2x its forward), no
    input gradient (nothing below it trains)."""
    cfg = model.config
    tower, merger = cfg.encoders["vision"], cfg.projectors["vision"]
    grids = [(1, 36, 52), (8, 24, 42)]
    want = 0.0
    for t, h, w in grids:
        layers = costs.encoder_layers("vision", tower, tokens=t * h * w, temporal_slices=t, trainable=False)
        proj = costs.projector_layer("vision", merger, tower.d_model, cfg.llm.d_model, t * h * w)
        want += sum(layer.weight_flops + layer.free_flops for layer in layers) + 2 * proj.weight_flops
    enc, _ = model.workload(1000, {"vision": grids})
    assert enc == pytest.approx(want, rel=1e-12)
    # A video of 8 slices attends within each slice: cheaper than one image of the same patch count.
    one_image = model.encoder_flops("vision", [(1, 48, 56)])
    video = model.encoder_flops("vision", [(8, 12, 28)])
    assert video < one_image
    with pytest.raises(ValueError, match="no encoder"):
        model.encoder_flops("audio", [])


def test_variable_resolution_family_balances(tmp_path):
    out = tmp_path / "mb.json"
    res = microbatch_balance.main(["--quick", "--trials", "1", "--out", str(out)])
    vr = res["variable_resolution"]
    assert vr["family"] == "variable_resolution" and res["family"] == "llava"
    for r in (res, vr):
        assert r["cv_balanced"] < r["cv_random"] and r["predicted_speedup"] > 1.0
        assert r["meets_target"]
    assert out.exists()


def test_drawn_instances_are_what_the_processor_grids():
    from mllm_jax.data.processor.native_vision import NativeVisionProcessor, smart_resize

    proc = NativeVisionProcessor.for_model(varres.qwen25vl_7b().encoders["vision"])
    rng = np.random.default_rng(0)
    insts = [varres.draw_instance(rng, proc, video_fraction=0.3) for _ in range(200)]
    assert {i.kind for i in insts} == {"image", "video"}
    for i in insts:
        t, h, w = i.grid_thw
        px = h * w * proc.patch_size**2
        lo, hi = ((proc.min_pixels, proc.max_pixels) if i.kind == "image"
                  else (proc.video_min_pixels, proc.video_max_pixels))
        assert lo <= px <= hi and h % 2 == 0 and w % 2 == 0 and i.tokens == t * h * w // 4
        assert smart_resize(h * 14, w * 14, proc.factor, lo, hi) == (h * 14, w * 14)


# ------------------------------------------------------------- context parallelism: per-rank tiles in the kernels


def _swap_ranks(p, r0, r1):
    """The plan with the permutations of ranks r0 and r1 swapped but its per-rank predictions kept: a wrong plan."""
    import dataclasses

    perm = p.permutation.copy()
    n = p.shard_len
    a, b = slice(r0 * n, (r0 + 1) * n), slice(r1 * n, (r1 + 1) * n)
    perm[:, a], perm[:, b] = p.permutation[:, b], p.permutation[:, a]
    return dataclasses.replace(p, permutation=perm)


# (method, impl, kernel blocks (None: the kernel's defaults), planner block, mode): every planner block is smaller than
# the kernel's tile, so the plan counts tiles made of several permuted blocks. The ring on kernels.tiled is
# tests/test_context_attention.py's test_per_rank_balance_check_runs_the_real_ring_and_catches_a_wrong_plan.
CP_KERNELS = [
    ("allgather", "xla", (None, None), 64, "balanced"),  # kernels.tiled, 128 x 128 by default
    ("ring", "pallas_tpu", (128, 128), 64, "balanced"),  # TPU interpret mode
    ("allgather", "pallas_tpu", (128, 256), 32, "balanced"),
    ("ring", "pallas_gpu", (32, 64), 16, "balanced"),  # Triton interpret mode
    ("allgather", "pallas_gpu", (64, 32), 16, "uniform"),
]


@pytest.mark.slow
@pytest.mark.parametrize("method, impl, blocks, block, mode", CP_KERNELS)
def test_measured_rank_tiles_in_the_kernels_equal_the_plan(method, impl, blocks, block, mode):
    """benchmarks.cp_balance.measured_rank_tiles runs context_attention (ring or all-gather) on 2 fake devices with
    the kernel ``impl`` and counts each rank's tiles in the kernel itself (kernels.tiled's and the Triton kernel's tile
    loops, the Mosaic kernel's grid over its live-tile lists). They equal the plan's rank tiles, counted for the same
    kernel tile (the platform's, kernels.dispatch.kernel_tile, where the blocks are the kernel's defaults). The same
    plan with the two ranks' permutations swapped predicts other per-rank tiles than the kernel computes."""
    from benchmarks.cp_balance import measured_rank_tiles
    from mllm_jax.kernels.dispatch import kernel_tile
    from mllm_jax.parallel.context import plan

    cp, s, head_dim = 2, 512, 16
    meta = family_meta("multimodal_packed", s, np.random.default_rng([21, len(method), block]))
    shard = s // cp
    keys = shard if method == "ring" else s
    tile = blocks if blocks[0] else kernel_tile(impl, shard, keys, head_dim, backend="cpu")
    p = plan(meta, cp, mode, block, tile_q=tile[0], tile_k=tile[1], method=method)
    assert p.shard_len == shard and block < max(tile)
    kw = dict(method=method, impl=impl, block_q=blocks[0], block_k=blocks[1], heads=1, head_dim=head_dim)
    measured = measured_rank_tiles(meta, p, **kw)
    np.testing.assert_array_equal(measured, p.rank_tiles)
    if mode == "uniform":
        assert p.rank_tiles[0] != p.rank_tiles[1], p.rank_tiles
        measured_wrong = measured_rank_tiles(meta, _swap_ranks(p, 0, 1), **kw)
        assert not np.array_equal(measured_wrong, p.rank_tiles)
        np.testing.assert_array_equal(measured_wrong, p.rank_tiles[::-1])
