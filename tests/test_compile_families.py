"""Every layout family of vlm_tiny compiled for a TPU topology (Mosaic), the kernels in the program (GPU targets:
test_compile_families_gpu.py). Files of their own so that pytest-xdist (one file per worker) can run them beside
test_compile_target.py."""

from __future__ import annotations

import pytest

from mllm_jax.train import compile_target as ct
from mllm_jax.train import targets
from test_compile_target import _cfg, needs_tpu


# Every family the README says composes, three axes at a time on 8 chips (one compile covers three axes: the
# suite's time): each axis appears with two partners, pipeline with each of data, fsdp, tensor and context.
LAYOUT_FAMILIES = {
    "data_fsdp_tensor": ["ParallelConfig.data=2", "ParallelConfig.fsdp=2", "ParallelConfig.tensor=2"],
    "data_context_allgather": ["ParallelConfig.data=2", "ParallelConfig.context=4",
                               'ContextConfig.block="auto"'],  # the padded length the target's kernel tile gives
    "fsdp_context_ring": ["ParallelConfig.fsdp=2", "ParallelConfig.context=4", 'ContextConfig.attention="ring"'],
    "pipeline_data_tensor": ["ParallelConfig.pipeline=2", "ParallelConfig.data=2", "ParallelConfig.tensor=2",
                             "ParallelConfig.microbatches=2"],
    # An uneven split of 4 layers stored in blocks of 2: the rows moved between the stages (pipeline.split_moves).
    "pipeline_fsdp_context": ["ParallelConfig.pipeline=2", "ParallelConfig.fsdp=2", "ParallelConfig.context=2",
                              "ParallelConfig.microbatches=2", "LLMConfig.n_layers=4",
                              "ParallelConfig.pipeline_stage_layers=(3, 1)"],
}
TPU_TARGET = "tpu:v5e:2x4"


@needs_tpu
@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(LAYOUT_FAMILIES))
def test_every_layout_family_compiles_for_tpu_with_its_pallas_kernels(family):
    """vlm_tiny's train step on v5e:2x4 with the Mosaic kernels in the program: they run inside shard_map over the
    axes that shard batch, heads and sequence (kernels.sharding.per_shard, kernels.context_parallel). Failed on every
    multi-device layout in 2026-12 ("Mosaic kernels cannot be automatically partitioned")."""
    r = ct.compile_for_target(_cfg(*LAYOUT_FAMILIES[family]), targets.parse(TPU_TARGET), costs=False)
    assert r["fits"] and r["attention_impl"] == "pallas_tpu" and r["devices"] == 8
    # The ViT's and the LLM's attention are Pallas calls (dQ kernels: one per layer's backward, at least).
    assert r["pallas_kernels"].get("mllm_flash_dq", 0) >= 1 and r["pallas_calls"] >= 3, r["pallas_kernels"]


@needs_tpu
@pytest.mark.slow
def test_native_resolution_recipe_compiles_for_tpu_with_its_pallas_kernels():
    """qwen2vl_tiny (packed patch rows of several instances, 2-D RoPE tower, patch merger, M-RoPE LLM) on v5e:2x2 with
    data x context: the tower's attention and the LLM's are Mosaic calls in the compiled step."""
    from mllm_jax.train import loop
    from test_compile_target import ROOT

    cfg = loop.load_run_config([f"{ROOT}/configs/qwen2vl_tiny.gin"],
                               ["ParallelConfig.data=2", "ParallelConfig.context=2", "ParallelConfig.microbatches=1",
                                "DataConfig.batch_size=4", "DataConfig.eval_batches=1"])
    r = ct.compile_for_target(cfg, targets.parse("tpu:v5e:2x2"), costs=False)
    assert r["fits"] and r["attention_impl"] == "pallas_tpu"
    assert r["pallas_kernels"].get("mllm_flash_dq", 0) >= 2 and r["pallas_calls"] >= 4, r["pallas_kernels"]
