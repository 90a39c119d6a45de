"""The training data of a run: the synthetic stream (mllm_jax.data) or a real dataset (mllm_jax.data.datasets).

Both give this host's rows of each global batch with a leading microbatch axis ([M, rows, ...], feature_index global
within each microbatch), a JSON-able ``state()`` saved in the checkpoint for exact resume, and ``bad_sample_counts``
(None for synthetic data).
"""

from __future__ import annotations

import os

from mllm_jax import distributed
from mllm_jax.data import SyntheticBatches, TextCodec
from mllm_jax.data.tokenizer import PAD


def uses_real_data(dataset_config) -> bool:
    """A real dataset is configured: DatasetConfig.path names its file (DatasetConfig.format picks the reader)."""
    return dataset_config is not None and bool(dataset_config.path)


def load_tokenizer(path: str):
    """A Hugging Face tokenizers.Tokenizer from a tokenizer.json file."""
    from tokenizers import Tokenizer

    if not path or not os.path.isfile(path):
        raise ValueError(f"DataConfig.tokenizer_path must name a tokenizer.json file for a real dataset; got {path!r}")
    return Tokenizer.from_file(path)


class SyntheticTrainData:
    """This host's share of the synthetic stream: rows ``distributed.host_local_slice`` of every microbatch."""

    bad_sample_counts = None

    def __init__(self, model_config, data_config, *, microbatches: int, codec: TextCodec):
        self.batches = SyntheticBatches(model_config, data_config, microbatches=microbatches, codec=codec)

    def next_host_batch(self, mesh) -> dict:
        data = self.batches
        rows = distributed.host_local_slice(data.cfg.batch_size // data.microbatches, mesh)
        batch = distributed.local_synthetic_batch(data, data.index, rows)
        data.index += 1  # the position resume restores: batch i is the i-th of the stream on every host
        return batch

    def state(self) -> dict:
        return self.batches.state()

    def restore(self, state: dict) -> None:
        self.batches.restore(state)

    def close(self) -> None:
        pass


class RealTrainData:
    """A LLaVA-JSON or audio-caption dataset through mllm_jax.data.datasets.Loader (prefetching, host-sharded by data
    rank, workload-balanced microbatches). Built after the checkpoint is read: the loader starts at ``state``."""

    def __init__(self, dataset_config, tokenizer, model_config, parallel_config, *, state: dict | None = None):
        from mllm_jax.data.datasets import Loader, make_source

        pad = tokenizer.token_to_id(PAD)
        source = make_source(dataset_config, tokenizer, model_config)
        self.loader = Loader(source, dataset_config, model_config,
                             num_data_ranks=parallel_config.data * parallel_config.fsdp,
                             microbatches=parallel_config.microbatches, state=state,
                             pad_id=0 if pad is None else int(pad))

    def next_host_batch(self, mesh) -> dict:
        return next(self.loader)

    def state(self) -> dict:
        return self.loader.state()

    @property
    def bad_sample_counts(self) -> dict:
        return self.loader.bad_sample_counts

    def close(self) -> None:
        self.loader.close()
