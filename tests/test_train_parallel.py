"""train.py's main with pipeline, context and fsdp layouts trains exactly like the plain data-parallel run (the
oracle: same model, same data, data=8; tests/test_train_cli.py ties data=8 to one device): the same loss at every
step, and the same held-out loss and caption accuracy at the end (under context parallelism the eval batch is
permuted and predictions are compared with the labels in that same order).

Tolerances: the layouts only reorder float sums (pipeline stages, sequence shards, tensor-parallel matmuls), so losses
agree to float32 round-off over 2 steps of AdamW."""

import numpy as np
import pytest

from tests.train_main import TINY, losses, run_main

STEPS = 2
BASE = TINY + [f"TrainConfig.steps = {STEPS}", "TrainConfig.checkpoint_every = 100"]
RTOL = 2e-5


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return run_main(str(tmp_path_factory.mktemp("data8")), BASE + ["ParallelConfig.data = 8"])


def _assert_same_run(rows, ref, what):
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1)), what
    got, want = losses(rows), losses(ref)
    np.testing.assert_allclose([got[s] for s in want], [want[s] for s in want], rtol=RTOL, err_msg=what)
    assert rows[-1]["eval_loss"] == pytest.approx(ref[-1]["eval_loss"], rel=RTOL), what
    assert rows[-1]["eval_accuracy"] == ref[-1]["eval_accuracy"], what


@pytest.mark.slow
@pytest.mark.parametrize("layout", [
    # Pipeline stages whose decoder layers run context-parallel attention on the permuted, sequence-sharded batch,
    # with the microbatch rows over `data`.
    ["ParallelConfig.data = 2", "ParallelConfig.pipeline = 2", "ParallelConfig.context = 2",
     "ParallelConfig.microbatches = 2", "ContextConfig.block = 16", 'ContextConfig.mode = "balanced"'],
    # FSDP-stored, tensor-parallel layers inside the stages (weights gathered over fsdp only, heads split), the rows
    # over `fsdp`.
    ["ParallelConfig.fsdp = 2", "ParallelConfig.pipeline = 2", "ParallelConfig.tensor = 2",
     "ParallelConfig.microbatches = 2"],
], ids=["data2_pipeline2_context2", "fsdp2_pipeline2_tensor2"])
def test_pipeline_trains_like_data_parallel(reference, tmp_path, layout):
    from mllm_jax.train import loop

    assert loop.make_grads_fn(loop.load_run_config(["configs/vlm_tiny.gin"], BASE + layout), None) is not None
    _assert_same_run(run_main(str(tmp_path), BASE + layout), reference, layout)


@pytest.mark.slow
def test_context_parallel_trains_like_data_parallel_in_every_mode(reference, tmp_path):
    # zigzag and balanced through train.py; every mode's model loss and gradients: test_context_integration.py
    # (uniform and lpt only permute the host batch differently; the planner tests check their permutations).
    layouts = [(["ParallelConfig.data = 4", "ParallelConfig.context = 2", "ContextConfig.block = 16"], mode)
               for mode in ("zigzag", "balanced")]
    # The block chosen from the ring's kernel tile (ContextConfig.block = "auto": kernels.tiled's 32 x 32 on the
    # 32-token shards here, so 32-token blocks).
    layouts.append((["ParallelConfig.data = 2", "ParallelConfig.context = 2", "ParallelConfig.tensor = 2",
                     'ContextConfig.attention = "ring"', 'ContextConfig.block = "auto"'], "balanced"))
    for i, (layout, mode) in enumerate(layouts):
        params = BASE + layout + [f'ContextConfig.mode = "{mode}"']
        _assert_same_run(run_main(str(tmp_path / str(i)), params), reference, (layout, mode))


@pytest.mark.slow
def test_fsdp8_with_batch_sharded_encoder_inputs_trains_like_data_parallel(reference, tmp_path):
    _assert_same_run(run_main(str(tmp_path), BASE + ["ParallelConfig.fsdp = 8"]), reference, "fsdp8")


def test_context_permutation_keeps_every_token_and_its_features():
    """The host-side permutation of a microbatched batch: each row is a permutation of the original row's tokens
    (plus padding), token arrays move together, and S' is a multiple of context x block."""
    import gin

    from mllm_jax.data import SyntheticBatches
    from mllm_jax.train import loop
    from mllm_jax.data.context_batches import permute_for_context

    gin.clear_config()
    try:
        cfg = loop.load_run_config(["configs/vlm_tiny.gin"], BASE + [
            "ParallelConfig.data = 4", "ParallelConfig.context = 2", "ParallelConfig.microbatches = 2",
            "ContextConfig.block = 16", 'ContextConfig.mode = "balanced"', "DataConfig.seq_len = 56"])
    finally:
        gin.clear_config()
    batch = SyntheticBatches(cfg.model, cfg.data, microbatches=2).batch_at(0)
    out, plan = permute_for_context(batch, cfg.parallel, leading=1)
    m, b, s = batch["input_ids"].shape
    assert out["input_ids"].shape == (m, b, 64) and out["labels"].shape == (m, b, 64)  # 56 -> 2 x 2 x 16
    assert out["encoder_inputs"]["vision"] is batch["encoder_inputs"]["vision"]
    perm = plan.permutation.reshape(m, b, -1)
    for k in ("input_ids", "labels", "positions", "segment_ids", "span_ids"):
        want = np.take_along_axis(batch[k], np.maximum(perm, 0), axis=2)
        real = perm >= 0
        np.testing.assert_array_equal(out[k][real], want[real], err_msg=k)
    fidx = out["feature_index"]["vision"]
    np.testing.assert_array_equal(np.sort(fidx[fidx >= 0]), np.sort(batch["feature_index"]["vision"][
        batch["feature_index"]["vision"] >= 0]))
    assert (out["segment_ids"][perm < 0] == 0).all() and (out["labels"][perm < 0] == -100).all()
    for row in perm.reshape(m * b, -1):
        np.testing.assert_array_equal(np.sort(row[row >= 0]), np.arange(s))  # every token exactly once
