"""Deprecated name of kernels.tiled, kept only for benchmarks/throughput.py (owned elsewhere): import kernels.tiled."""

from mllm_jax.kernels.tiled import default_block, tiled_attention  # noqa: F401
