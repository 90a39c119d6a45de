"""A native-resolution model (packed patch rows, M-RoPE) under pipeline parallelism: the encoders run outside the
pipeline on the flattened microbatches' patch rows (train.pipelined_step.flatten_microbatches), and the loss equals
plain data parallelism's at every step."""

import numpy as np
import pytest

from tests.test_native_model import RECIPE, TINY_NATIVE
from tests.train_main import losses, run_main

STEPS = 2


@pytest.mark.slow
def test_native_batch_trains_under_pipeline_like_data_parallel(tmp_path):
    base = TINY_NATIVE + [f"TrainConfig.steps = {STEPS}", "DataConfig.batch_size = 16", "ParallelConfig.microbatches = 2"]
    ref = losses(run_main(str(tmp_path / "data8"), base + ["ParallelConfig.data = 8"], gin_file=RECIPE))
    got = losses(run_main(str(tmp_path / "pp"), base + ["ParallelConfig.data = 4", "ParallelConfig.pipeline = 2"],
                          gin_file=RECIPE))
    assert sorted(ref) == sorted(got) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([got[s] for s in ref], [ref[s] for s in ref], rtol=2e-5)
