"""Host-side (numpy) validation of a batch against a ModelConfig, before anything is traced (docs/contracts.md)."""

from __future__ import annotations

import numpy as np

from mllm_jax.config import AudioConfig, ModelConfig, VisionConfig

META_KEYS = ("labels", "positions", "segment_ids", "span_ids")
# The label of a token that is not predicted (prompt, placeholders, padding): the loss skips it.
IGNORE = -100


def _shape(a) -> tuple:
    return tuple(np.shape(a))


def check_encoder_input(name: str, ecfg, x) -> int:
    """Shape check of one modality's encoder input; returns N (instances)."""
    s = _shape(x)
    if isinstance(ecfg, VisionConfig):
        want = (ecfg.image_size, ecfg.image_size, ecfg.num_channels)
        if len(s) != 4 or s[3] != ecfg.num_channels:
            raise ValueError(f"encoder_inputs[{name!r}] must be NHWC [N, H, W, {ecfg.num_channels}]; got shape {s}")
        if s[1] % ecfg.patch_size or s[2] % ecfg.patch_size:
            raise ValueError(f"encoder_inputs[{name!r}]: pixels {s[1]}x{s[2]} do not fit the patch grid of "
                             f"patch_size {ecfg.patch_size}")
        if s[1:] != want:
            raise ValueError(f"encoder_inputs[{name!r}]: images must be {want[0]}x{want[1]}x{want[2]}; got {s[1:]}")
    elif isinstance(ecfg, AudioConfig):
        if len(s) != 3 or s[2] != ecfg.n_mels:
            raise ValueError(f"encoder_inputs[{name!r}] must be log-mel [N, T, n_mels={ecfg.n_mels}]; got shape {s}")
        if s[1] != ecfg.num_frames:
            raise ValueError(f"encoder_inputs[{name!r}] must have T = {ecfg.num_frames} frames; got {s[1]}")
    return s[0]


def check_batch(batch: dict, config: ModelConfig) -> None:
    """Raise ValueError naming what is wrong: shapes, vocabulary range, placeholder/feature counts per sample."""
    if "input_ids" not in batch:
        raise ValueError("batch has no 'input_ids'")
    ids = np.asarray(batch["input_ids"])
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be [B, S]; got shape {ids.shape}")
    for k in META_KEYS:
        if k not in batch:
            raise ValueError(f"batch has no {k!r}")
        if _shape(batch[k]) != ids.shape:
            raise ValueError(f"{k} shape {_shape(batch[k])} must equal input_ids shape {ids.shape}")
    vocab = config.llm.vocab_size
    if ids.size and (ids.min() < 0 or ids.max() >= vocab):
        bad = np.argwhere((ids < 0) | (ids >= vocab))[0]
        raise ValueError(f"input_ids must be in [0, {vocab}) (vocab_size); sample {bad[0]} has id "
                         f"{ids[tuple(bad)]} at position {bad[1]}")
    labels = np.asarray(batch["labels"])
    bad_lab = (labels != IGNORE) & ((labels < 0) | (labels >= vocab))
    if bad_lab.any():
        b, s = np.argwhere(bad_lab)[0]
        raise ValueError(f"labels must be {IGNORE} or in [0, {vocab}); sample {b} has {labels[b, s]} at position {s}")
    inputs = batch.get("encoder_inputs") or {}
    index = batch.get("feature_index") or {}
    for name in sorted(set(inputs) | set(index)):
        if name not in config.encoders:
            raise ValueError(f"batch modality {name!r} has no encoder in the config ({sorted(config.encoders)})")
        if name not in inputs or name not in index:
            raise ValueError(f"modality {name!r} needs both encoder_inputs and feature_index in the batch")
        n = check_encoder_input(name, config.encoders[name], inputs[name])
        fi = np.asarray(index[name])
        if fi.shape != ids.shape:
            raise ValueError(f"feature_index[{name!r}] shape {fi.shape} must equal input_ids shape {ids.shape}")
        total = n * config.features_per_instance(name)
        if fi.size and fi.max() >= total:
            raise ValueError(f"feature_index[{name!r}] max {fi.max()} is beyond the {total} features "
                             f"({n} instances x {config.features_per_instance(name)} tokens)")
        is_ph = ids == config.placeholder_ids[name]
        n_ph, n_feat = is_ph.sum(axis=1), (fi >= 0).sum(axis=1)
        for b in range(ids.shape[0]):
            if n_ph[b] != n_feat[b]:
                raise ValueError(f"sample {b}: {n_ph[b]} {name!r} placeholder tokens but {n_feat[b]} {name!r} "
                                 f"features (feature_index >= 0)")
        misplaced = (fi >= 0) & ~is_ph
        if misplaced.any():
            b, s = np.argwhere(misplaced)[0]
            raise ValueError(f"sample {b}: feature_index[{name!r}] points at position {s}, which is not a "
                             f"{name!r} placeholder (id {ids[b, s]})")
    for name, pid in config.placeholder_ids.items():
        if name not in index:
            n_ph = (ids == pid).sum(axis=1)
            if n_ph.any():
                b = int(np.argmax(n_ph > 0))
                raise ValueError(f"sample {b}: {n_ph[b]} {name!r} placeholder tokens but 0 {name!r} features "
                                 f"(the batch has no {name!r} inputs)")
