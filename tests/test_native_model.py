"""Native-resolution images and videos through the whole model: packing several instances of different sizes into
patch rows gives each one exactly the features and logits it has alone (the oracle: every sample run by itself, one
instance per row); a native batch trains under train.py on 8 fake devices with data x fsdp x context like data=8; the
tiny recipe (configs/qwen2vl_tiny.gin) learns."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mllm_jax import MultimodalModel, check_batch
from mllm_jax.config import LLMConfig, ModelConfig, NativeVisionConfig, ProjectorConfig
from mllm_jax.data import synthetic
from mllm_jax.data.batching import BatchBuilder, SyntheticBatches
from mllm_jax.train import loop
from mllm_jax.train.config import DataConfig
from tests.train_main import losses, run_main

ATOL = 1e-4


def _config() -> ModelConfig:
    enc = NativeVisionConfig(patch_size=4, d_model=16, n_layers=2, n_heads=2, d_ff=32, min_pixels=16 * 16,
                             max_pixels=48 * 48, patches_per_row=256)
    llm = LLMConfig(vocab_size=80, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=64, mrope_section=(2, 3, 3))
    return ModelConfig(llm=llm, encoders={"vision": enc}, projectors={"vision": ProjectorConfig(kind="patch_merger")},
                       placeholder_ids={"vision": 3}, media_attention="causal")


def _samples():
    """Images of three sizes, two videos (4 and 6 frames) and a text sample: 5 instances of 60..144 patches."""
    rng = np.random.default_rng(3)
    out = []
    for h, w in ((24, 40), (48, 24), (32, 32)):
        out.append(synthetic.Sample("image", "<image> describe the image .", "a red circle at the top left",
                                    [("vision", synthetic.native_image(rng, h, w, "red", "circle", 0, 0))]))
    for t, motion in ((4, "downward"), (6, "leftward")):  # the 6-frame clip travels along its 32-px side
        clip = synthetic.native_video(rng, t, 24, 32, "blue", "square", motion)
        out.append(synthetic.Sample("video", "<image> describe the video .", f"a blue square moving {motion}",
                                    [("vision", clip)]))
    out.append(synthetic.make_sample(rng, "text"))
    return out


@pytest.fixture(scope="module")
def setup():
    cfg = _config()
    model = MultimodalModel(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, batch):
        m = nnx.merge(graphdef, state)
        feats = m.encode("vision", batch["encoder_inputs"]["vision"])
        return feats.reshape(-1, feats.shape[-1]), m.llm.logits(m(batch))

    return cfg, state, run


def test_packed_instances_get_exactly_their_own_features_and_logits(setup):
    cfg, state, run = setup
    samples = _samples()
    packed_builder = BatchBuilder(cfg, DataConfig(seq_len=128, samples_per_row=2))
    packed = packed_builder.build(samples)
    check_batch(packed, cfg)
    seg = packed["encoder_inputs"]["vision"]["segment_ids"]
    assert seg.shape[0] == 2 and seg.max() >= 3  # 5 instances share 2 rows: really packed, several to a row
    feats_p, logits_p = run(state, packed)
    alone_builder = BatchBuilder(cfg, DataConfig(seq_len=128, samples_per_row=1))
    for i, sample in enumerate(samples):
        alone = alone_builder.build([sample])
        feats_a, logits_a = run(state, alone)
        row, seg_id = divmod(i, 2)
        cols = np.flatnonzero(packed["segment_ids"][row] == seg_id + 1)
        n = len(cols)
        np.testing.assert_array_equal(packed["input_ids"][row, cols], alone["input_ids"][0, :n])
        np.testing.assert_array_equal(packed["rope_positions"][row, cols], alone["rope_positions"][0, :n])
        fi_p, fi_a = packed["feature_index"]["vision"][row, cols], alone["feature_index"]["vision"][0, :n]
        if sample.media:
            assert (fi_p >= 0).sum() == (fi_a >= 0).sum() > 0
            np.testing.assert_allclose(np.asarray(feats_p)[fi_p[fi_p >= 0]], np.asarray(feats_a)[fi_a[fi_a >= 0]],
                                       atol=ATOL, rtol=0, err_msg=f"sample {i}: projected features")
        np.testing.assert_allclose(np.asarray(logits_p)[row, cols], np.asarray(logits_a)[0, :n], atol=ATOL, rtol=0,
                                   err_msg=f"sample {i} ({sample.task}): logits")


def test_a_wrong_grid_changes_the_features_so_the_oracle_can_fail(setup):
    """The comparison above could fail: the same patches read with another instance's grid (2-D RoPE) differ."""
    cfg, state, run = setup
    batch = BatchBuilder(cfg, DataConfig(seq_len=128, samples_per_row=1)).build(_samples()[:1])
    feats, _ = run(state, batch)
    grid = batch["encoder_inputs"]["vision"]["grid"]
    bad = dict(batch, encoder_inputs={"vision": dict(batch["encoder_inputs"]["vision"], grid=grid[..., [0, 2, 1]])})
    feats_bad, _ = run(state, bad)
    used = batch["feature_index"]["vision"][0]
    used = used[used >= 0]
    assert np.abs(np.asarray(feats_bad)[used] - np.asarray(feats)[used]).max() > 10 * ATOL


# ------------------------------------------------------------------------------------------- train.py, the recipe


TINY_NATIVE = [
    "LLMConfig.n_layers = 2", "LLMConfig.d_model = 32", "LLMConfig.n_heads = 2", "LLMConfig.n_kv_heads = 2",
    "LLMConfig.d_ff = 64", "NativeVisionConfig.n_layers = 1", "NativeVisionConfig.d_model = 16",
    "NativeVisionConfig.n_heads = 2", "NativeVisionConfig.d_ff = 32", "DataConfig.seq_len = 128",
    "DataConfig.samples_per_row = 2", "DataConfig.batch_size = 8", "DataConfig.eval_batches = 0",
    "OptimizerConfig.warmup_steps = 1", "OptimizerConfig.learning_rate = 1e-2", "TrainConfig.log_every = 1",
    "TrainConfig.eval_every = 0", "TrainConfig.progress_bar = False", "TrainConfig.checkpoint_every = 100", "CheckpointConfig.async_save = False",
    "DataConfig.mixture_warmup = {}", "DataConfig.mixture_warmup_steps = 0",  # images and videos from step 1
]
RECIPE = "configs/qwen2vl_tiny.gin"
STEPS = 8


def test_native_batch_trains_under_pipeline_like_data_parallel_learns_and_reports_padding(tmp_path):
    """The recipe (shrunk) on data=8 (the one-device oracle: tests/test_train_cli.py ties them) and on pipeline=2 x
    data=4 (the tower runs outside the pipeline on the microbatches' patch rows flattened together): the same loss at
    every step (layouts reorder float sums only); the loss falls; the metrics report the row buckets' padding. (data x
    fsdp x context = 2 x 2 x 2 on a native batch: tests/test_datasets_native.py, the same model on real files.)"""
    base = TINY_NATIVE + [f"TrainConfig.steps = {STEPS}", "DataConfig.batch_size = 16",
                          "ParallelConfig.microbatches = 2"]
    rows = run_main(str(tmp_path / "data8"), base + ["ParallelConfig.data = 8"], gin_file=RECIPE)
    ref = losses(rows)
    got = losses(run_main(str(tmp_path / "pp"), base + ["ParallelConfig.data = 4", "ParallelConfig.pipeline = 2"],
                          gin_file=RECIPE))
    assert sorted(ref) == sorted(got) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([got[s] for s in ref], [ref[s] for s in ref], rtol=2e-5)
    # Learning: from chance (ln 128 = 4.85) down by over a fifth in 8 steps.
    assert ref[STEPS] < 0.8 * ref[1], ref
    # patch_padding of step 1 (log_every = 1) = the padded share of the first batch's patch rows, counted here.
    cfg = loop.load_run_config([RECIPE], base + ["ParallelConfig.data = 8"])
    seg = SyntheticBatches(cfg.model, cfg.data, microbatches=2).batch_at(0)["encoder_inputs"]["vision"]["segment_ids"]
    assert rows[0]["step"] == 1 and rows[0]["patch_padding"] == pytest.approx(float((seg == 0).mean()), rel=1e-12)
    assert 0 < rows[0]["patch_padding"] < 1
