"""The training data of a run: the synthetic stream (mllm_jax.data) or a real dataset (mllm_jax.data.datasets).

Both give this host's rows of each global batch with a leading microbatch axis ([M, rows, ...], feature_index global
within each microbatch), a JSON-able ``state()`` saved in the checkpoint for exact resume, and ``bad_sample_counts``
(None for synthetic data).
"""

from __future__ import annotations

import os

from mllm_jax import distributed
from mllm_jax.data import SyntheticBatches, TextCodec, batching
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


def check_encoder_options(data_config, model_config, parallel_config, *, real_data: bool) -> None:
    """DataConfig.encoder_balance / encoder_cache / epoch_samples make sense for this run (before anything is built).
    ``parallel_config``: the run's layout (every layout family takes both options). ``real_data``: a real dataset
    (its instances are keyed by their media files' content; the synthetic stream's by sample id)."""
    from mllm_jax.data.encoder_balance import check_mode
    from mllm_jax.multimodal import encoder_is_frozen

    check_mode(data_config.encoder_balance)
    if data_config.epoch_samples < 0:
        raise ValueError(f"DataConfig.epoch_samples must be >= 0; got {data_config.epoch_samples}")
    if not data_config.encoder_cache:
        return
    frozen = [n for n in sorted(model_config.encoders) if encoder_is_frozen(model_config, n)]
    if not frozen:
        raise ValueError(f"DataConfig.encoder_cache={data_config.encoder_cache!r} caches frozen encoders' features, "
                         f"but no encoder of {sorted(model_config.encoders)} is frozen (ModelConfig.trainable)")


def _frozen_encoders(model, mesh, parallel_config, model_config):
    from mllm_jax.data import encoder_cache
    from mllm_jax.multimodal import encoder_is_frozen

    names = [n for n in sorted(model_config.encoders) if encoder_is_frozen(model_config, n)]
    return encoder_cache.FrozenEncoders(model, mesh, parallel_config, names)


class SyntheticTrainData:
    """This host's share of the synthetic stream: rows ``distributed.host_local_slice`` of every microbatch.
    With a feature cache attached (``use_encoder_cache``), frozen modalities come as ``encoder_features``."""

    bad_sample_counts = None

    def __init__(self, model_config, data_config, *, microbatches: int, codec: TextCodec):
        self.batches = SyntheticBatches(model_config, data_config, microbatches=microbatches, codec=codec)
        self.cache, self.encode = None, None

    def use_encoder_cache(self, model, mesh, parallel_config) -> None:
        """Serve frozen encoders' features from DataConfig.encoder_cache (mllm_jax.data.encoder_cache), computing
        and storing the missing ones with a copy of ``model``'s frozen encoders (call before the first step)."""
        from mllm_jax.data import encoder_cache

        cfg = self.batches.builder.model_config
        self.encode = _frozen_encoders(model, mesh, parallel_config, cfg)
        self.cache = encoder_cache.open_cache(self.batches.cfg.encoder_cache, cfg,
                                              encoder_cache.synthetic_preprocessing(self.batches.cfg), self.encode)

    @property
    def cache_counts(self) -> dict | None:
        """The feature cache's hits / misses / corrupt entries since the processes opened it, summed over them (None:
        no cache). A collective with several processes: every process reads it at the same steps (the metrics')."""
        return None if self.cache is None else self.cache.total_counts()

    def cached_eval(self, batch: dict, keys: dict) -> dict:
        """A held-out batch with frozen modalities' features from the cache (the batch unchanged without one).
        ``keys``: the eval stream's ``instance_keys`` ("eval:..." ids: never a train sample's entry); the first
        evaluation encodes and stores them, later ones (and resumed runs) read them."""
        return batch if self.cache is None else self.cache.features(batch, keys, self.encode)

    def next_host_batch(self, mesh) -> dict:
        data = self.batches
        rows = distributed.host_local_slice(data.cfg.batch_size // data.microbatches, mesh)
        batch = batching.local_synthetic_batch(data, data.index, rows)
        if self.cache is not None:  # this host holds span rows.start // len(rows) of the step's equal spans
            batch = self.cache.features(batch, data.instance_keys(data.index, rows), self.encode,
                                        span=rows.start // (rows.stop - rows.start))
        data.index += 1  # the position resume restores: batch i is the i-th of the stream on every host
        return batch

    def state(self) -> dict:
        return self.batches.state()

    def restore(self, state: dict) -> None:
        self.batches.restore(state)

    def close(self) -> None:
        pass


def vision_processor_path(dataset_config, model_config, pretrained=None) -> str:
    """Where the image processor of a vision tower that reads one from Hugging Face (a native-resolution tower, or
    Gemma 3's with its pan-and-scan settings) comes from: DatasetConfig.processor_path when set, else the pretrained
    checkpoint directory of the run (PretrainedConfig.encoders["vision"], else .model) when it holds a Hugging Face
    preprocessor_config.json, else "" (the tower's own config)."""
    if dataset_config.processor_path or "vision" not in model_config.encoders or pretrained is None:
        return dataset_config.processor_path
    projector = (model_config.projectors or {}).get("vision")
    if not (model_config.is_native_resolution("vision") or getattr(projector, "kind", "") == "gemma3"):
        return dataset_config.processor_path
    for d in (pretrained.encoders.get("vision"), pretrained.model):
        if d and os.path.isfile(os.path.join(d, "preprocessor_config.json")):
            return d
    return ""


class RealTrainData:
    """A LLaVA-JSON or audio-caption dataset through mllm_jax.data.datasets.Loader (prefetching, host-sharded by data
    rank, workload-balanced microbatches). Built after the checkpoint is read: the loader starts at ``state``.
    ``encoder_cache``: DataConfig.encoder_cache; with ``use_encoder_cache`` frozen modalities come as
    ``encoder_features``, keyed by the sha256 of each instance's media file (``Loader.last_instance_keys``).
    ``pretrained``: the run's PretrainedConfig: a native or Gemma 3 vision tower's processor is read from its checkpoint
    directory's preprocessor_config.json (``vision_processor_path``)."""

    def __init__(self, dataset_config, tokenizer, model_config, parallel_config, *, state: dict | None = None,
                 encoder_cache: str = "", pretrained=None):
        import dataclasses

        from mllm_jax.data.datasets import Loader, make_source

        processor_path = vision_processor_path(dataset_config, model_config, pretrained)
        if processor_path != dataset_config.processor_path:
            dataset_config = dataclasses.replace(dataset_config, processor_path=processor_path)
        pad = tokenizer.token_to_id(PAD)
        self.source = make_source(dataset_config, tokenizer, model_config)
        self.model_config, self.encoder_cache = model_config, encoder_cache
        self.cache, self.encode = None, None
        self.loader = Loader(self.source, dataset_config, model_config,
                             num_data_ranks=parallel_config.data * parallel_config.fsdp,
                             microbatches=parallel_config.microbatches, state=state,
                             pad_id=0 if pad is None else int(pad))

    def use_encoder_cache(self, model, mesh, parallel_config) -> None:
        """Serve frozen encoders' features from ``encoder_cache`` (see SyntheticTrainData.use_encoder_cache)."""
        from mllm_jax.data import encoder_cache

        if not self.encoder_cache:
            raise ValueError(f"use_encoder_cache needs a cache folder (DataConfig.encoder_cache); got "
                             f"{self.encoder_cache!r}")
        self.encode = _frozen_encoders(model, mesh, parallel_config, self.model_config)
        self.cache = encoder_cache.open_cache(self.encoder_cache, self.model_config, self.source.preprocessing(),
                                              self.encode)

    @property
    def cache_counts(self) -> dict | None:
        return None if self.cache is None else self.cache.total_counts()

    def next_host_batch(self, mesh) -> dict:
        batch = next(self.loader)
        if self.cache is not None:  # this host feeds data ranks local_ranks: span start // len(local_ranks)
            ranks = self.loader.local_ranks
            batch = self.cache.features(batch, self.loader.last_instance_keys, self.encode,
                                        span=ranks.start // len(ranks))
        return batch

    def state(self) -> dict:
        return self.loader.state()

    @property
    def bad_sample_counts(self) -> dict:
        return self.loader.bad_sample_counts

    def close(self) -> None:
        self.loader.close()
