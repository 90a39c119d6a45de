"""vlm_tiny's layout families compiled for a GPU target (Triton), the kernels in the program: a file of its own so
that pytest-xdist (one file per worker) runs it beside the TPU families (test_compile_families.py)."""

from __future__ import annotations

import pytest

from mllm_jax.train import compile_target as ct
from mllm_jax.train import targets
from test_compile_families import LAYOUT_FAMILIES
from test_compile_target import _cfg, needs_cuda


@needs_cuda
@pytest.mark.slow
# Two of the TPU file's families (8 GPUs, three axes each): every axis but ring attention, which
# tests/test_context_attention.py compiles for the GPU inside the ring; one GPU in test_compile_target.
@pytest.mark.parametrize("family", ["data_fsdp_tensor", "pipeline_fsdp_context"])
def test_layout_families_compile_for_gpu_with_triton_kernels(family):
    r = ct.compile_for_target(_cfg(*LAYOUT_FAMILIES[family]), targets.parse("gpu:h100:1x8"), costs=False)
    assert r["fits"] and r["attention_impl"] == "pallas_gpu"
    assert r["pallas_calls"] >= 3, r["pallas_kernels"]
