"""A native-resolution model (packed patch rows, M-RoPE) under pipeline parallelism: the encoders run outside the
pipeline on the flattened microbatches' patch rows (train.pipelined_step.flatten_microbatches), and the loss equals
plain data parallelism's at every step. The metrics report the row buckets' patch padding."""

import numpy as np
import pytest

from mllm_jax.data.batching import SyntheticBatches
from mllm_jax.train import loop
from tests.test_native_model import RECIPE, TINY_NATIVE
from tests.train_main import losses, run_main

STEPS = 2


@pytest.mark.slow
def test_native_batch_trains_under_pipeline_like_data_parallel(tmp_path):
    base = TINY_NATIVE + [f"TrainConfig.steps = {STEPS}", "DataConfig.batch_size = 16", "ParallelConfig.microbatches = 2"]
    rows = run_main(str(tmp_path / "data8"), base + ["ParallelConfig.data = 8"], gin_file=RECIPE)
    ref = losses(rows)
    # patch_padding of step 1 (log_every = 1) = the padded share of the first batch's patch rows, counted here.
    cfg = loop.load_run_config([RECIPE], base + ["ParallelConfig.data = 8"])
    seg = SyntheticBatches(cfg.model, cfg.data, microbatches=2).batch_at(0)["encoder_inputs"]["vision"]["segment_ids"]
    assert rows[0]["step"] == 1 and rows[0]["patch_padding"] == pytest.approx(float((seg == 0).mean()), rel=1e-12)
    assert 0 < rows[0]["patch_padding"] < 1
    got = losses(run_main(str(tmp_path / "pp"), base + ["ParallelConfig.data = 4", "ParallelConfig.pipeline = 2"],
                          gin_file=RECIPE))
    assert sorted(ref) == sorted(got) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([got[s] for s in ref], [ref[s] for s in ref], rtol=2e-5)
