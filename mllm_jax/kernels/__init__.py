"""Attention for multimodal masks: token metadata, the block map, a pure-JAX reference and Pallas kernels."""

from mllm_jax.kernels.dispatch import attention
from mllm_jax.kernels.meta import FULL, PARTIAL, SKIP, TokenMeta, block_map, block_stats, mask

__all__ = ["attention", "TokenMeta", "mask", "block_map", "block_stats", "SKIP", "PARTIAL", "FULL"]
