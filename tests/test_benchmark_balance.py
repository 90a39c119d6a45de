"""The microbatch balancer on native-resolution workloads: samples priced from their instances' real patch grids
(benchmarks/microbatch_balance.py's variable_resolution family, mllm_jax.data.datasets.WorkloadModel)."""

import numpy as np
import pytest

from benchmarks import _variable_resolution as varres
from benchmarks import microbatch_balance
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
