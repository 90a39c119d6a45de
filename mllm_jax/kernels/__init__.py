"""Attention for multimodal masks: token metadata, the block map, a pure-JAX reference, the tiled XLA path, Pallas
kernels and context parallelism, behind one entry point, ``attention`` (kernels.dispatch)."""

from mllm_jax.kernels.dispatch import attention, choose, takes_mask
from mllm_jax.kernels.meta import FULL, PARTIAL, SKIP, TokenMeta, block_map, block_stats, mask

__all__ = ["attention", "choose", "takes_mask", "TokenMeta", "mask", "block_map", "block_stats", "SKIP", "PARTIAL",
           "FULL"]
