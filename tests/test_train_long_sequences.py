"""Every layout family trains at the lengths users train at (4096 tokens: LLaVA's and beyond) with the loss of plain
data parallelism: train.py's main on 8 fake CPU devices, the tiny model, packed rows of many captioned images.

At these lengths the LLM attention takes the tiled path (kernels.tiled), per shard under shard_map wherever the mesh
splits the batch or heads: before that, `data=2` at 2048 tokens crashed ("dynamic_slice on sharded dims"). The oracle
is the data=8 run of the same model and data; the layouts only reorder float sums. One length (the longer) keeps the
suite's time; at 2048 tokens tests/test_context_integration.py checks the model's loss and gradients under context
parallelism and tests/test_kernels_tiled.py the sharded tiled attention. FSDP shards the batch as data does (the same
per-shard tiled path); fsdp x tensor trains like data parallelism in tests/test_train_parallel.py (with pipeline)."""

import numpy as np
import pytest

from tests.train_main import TINY, losses, run_main

STEPS = 2
RTOL = 2e-5


def _base(seq_len):
    return TINY + [f"TrainConfig.steps = {STEPS}", "TrainConfig.checkpoint_every = 100",
                   f"DataConfig.seq_len = {seq_len}", f"LLMConfig.max_position_embeddings = {seq_len}",
                   f"DataConfig.samples_per_row = {seq_len // 32}", "DataConfig.batch_size = 8"]


LAYOUTS = {
    4096: [
        ["ParallelConfig.data = 2", "ParallelConfig.context = 4", "ContextConfig.attention = 'allgather'"],
        ["ParallelConfig.data = 2", "ParallelConfig.context = 2", "ParallelConfig.tensor = 2",
         "ContextConfig.attention = 'ring'"],
        ["ParallelConfig.data = 2", "ParallelConfig.pipeline = 2", "ParallelConfig.tensor = 2",
         "ParallelConfig.microbatches = 2"],
    ],
}


@pytest.mark.slow
@pytest.mark.parametrize("seq_len", sorted(LAYOUTS))
def test_layouts_train_like_data_parallel_at_long_sequences(tmp_path, seq_len):
    ref = run_main(str(tmp_path / "data8"), _base(seq_len) + ["ParallelConfig.data = 8"])
    want = losses(ref)
    assert sorted(want) == list(range(1, STEPS + 1)) and all(np.isfinite(list(want.values())))
    for i, layout in enumerate(LAYOUTS[seq_len]):
        rows = run_main(str(tmp_path / str(i)), _base(seq_len) + layout)
        got = losses(rows)
        np.testing.assert_allclose([got[s] for s in want], [want[s] for s in want], rtol=RTOL, err_msg=str(layout))
        assert rows[-1]["eval_loss"] == pytest.approx(ref[-1]["eval_loss"], rel=RTOL), layout
