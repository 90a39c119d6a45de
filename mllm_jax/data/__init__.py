"""Synthetic multimodal data, its tokenizer and the batches of docs/contracts.md."""

from mllm_jax.data.batching import IGNORE, BatchBuilder, SyntheticBatches, check_placeholders, feature_counts
from mllm_jax.data.tokenizer import TextCodec, build_tokenizer

__all__ = ["IGNORE", "BatchBuilder", "SyntheticBatches", "check_placeholders", "feature_counts", "TextCodec",
           "build_tokenizer"]
