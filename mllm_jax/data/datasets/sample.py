"""One tokenised sample, before and after its media are decoded, and the bad-sample policy.

A source turns a record into a ``PreparedSample`` (text tokenised, placeholder runs expanded, media paths checked;
cheap, so every host can prepare every sample of a global batch and plan the batch identically) and then into a
``Sample`` (media decoded into encoder inputs; done only by the host that owns the sample).
"""

from __future__ import annotations

import collections
import threading
from dataclasses import dataclass, field

import numpy as np
from absl import logging

from mllm_jax.batch import IGNORE


class BadSampleError(ValueError):
    """A record that cannot become a training sample. ``reason`` is a short counter key."""

    def __init__(self, sample_id: str, reason: str, detail: str):
        super().__init__(f"bad sample {sample_id!r} ({reason}): {detail}")
        self.sample_id = sample_id
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Instance:
    """One encoder instance (an image, an audio clip) and its placeholder run [start, start + length).

    A native-resolution instance (docs/native_resolution.md) also carries what planning read from its header: its
    patch grid (t, h, w) (the run is t*h*w / merge_size**2 long) and, for a video, the frames kept (indices into
    ``frame_files`` for a folder of frames, into the first axis of a .npy clip) and the seconds one temporal grid
    step spans (the M-RoPE time interval's). A Gemma 3 image and each of its pan-and-scan crops are one instance
    each (``view``), in the order image, crop 1, crop 2, ..."""

    modality: str
    start: int
    length: int
    media: str  # path of the file (or, for a video, the .npy file or folder of frames) it is decoded from
    grid: tuple | None = None  # native resolution: (t, h, w) patches
    video: bool = False
    frames: tuple = ()  # video: the frame indices kept (processor's sample_frames)
    frame_files: tuple = ()  # video folder: its frame images in order
    seconds_per_grid: float | None = None  # video: temporal_patch_size / the sampled frame rate
    view: int = 0  # Gemma 3 pan-and-scan: 0 the image itself, k > 0 its k-th crop (the same media file)


@dataclass
class PreparedSample:
    """Tokens and placeholder runs of a sample; media not yet decoded."""

    sample_id: str
    input_ids: np.ndarray  # [L] int32; placeholder runs hold the modality's placeholder id
    target_mask: np.ndarray  # [L] bool; True where the token is a training target (assistant text)
    instances: tuple  # of Instance, in order of appearance

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    def num_instances(self, modality: str) -> int:
        return sum(1 for inst in self.instances if inst.modality == modality)

    def labels(self) -> np.ndarray:
        """Next-token targets [L]: labels[t] = ids[t + 1] where token t + 1 is a target, else IGNORE.

        Shifted here, per sample, so packing and any later permutation never pair tokens of different samples."""
        out = np.full(self.input_ids.shape, IGNORE, np.int32)
        out[:-1] = np.where(self.target_mask[1:], self.input_ids[1:], IGNORE)
        return out


@dataclass
class Sample:
    prepared: PreparedSample
    encoder_inputs: tuple  # one float32 array per instance, same order as prepared.instances
    # One stable id per instance, same order: the sha256 hex of the media file's bytes the input was decoded from
    # (media.read_media), what a frozen encoder's feature cache keys its entries by. Independent of the record's
    # index, id and path, so a reordered or extended dataset still hits, and an edited file is a miss.
    instance_keys: tuple = ()

    @property
    def sample_id(self) -> str:
        return self.prepared.sample_id


class BadSampleLog:
    """Applies ``on_bad_sample``: "raise" re-raises, "skip" counts by reason and logs the sample id and reason.

    Thread-safe (decoding workers report here). ``counts`` is JSON-able and travels in the loader state."""

    def __init__(self, policy: str, counts: dict | None = None):
        if policy not in ("skip", "raise"):
            raise ValueError(f"on_bad_sample must be 'skip' or 'raise'; got {policy!r}")
        self.policy = policy
        self._counts = collections.Counter(counts or {})
        self._lock = threading.Lock()

    def report(self, err: BadSampleError) -> None:
        if self.policy == "raise":
            raise err
        with self._lock:
            self._counts[err.reason] += 1
        logging.warning("skipping %s", err)

    @property
    def counts(self) -> dict:
        with self._lock:
            return dict(self._counts)

    @property
    def total(self) -> int:
        return sum(self.counts.values())
