"""Typed configs of a training run (gin-configurable through mllm_jax.gin_setup, under these class names)."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field


def _check(cls: str, name: str, value, *, low, low_open: bool = False, high=None, integer: bool = False,
           none_ok: bool = False) -> None:
    """Refuse ``cls.name = value`` outside [low, high] ((low, ...] with ``low_open``), naming both."""
    if value is None and none_ok:
        return
    kind = numbers.Integral if integer else numbers.Real
    ok = isinstance(value, kind) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and (high is None or value < high)
    if not ok:
        bound = f"> {low}" if low_open else f">= {low}"
        bound += f" and < {high}" if high is not None else ""
        what = "an integer" if integer else "a finite number"
        raise ValueError(f"{cls}.{name} must be {what} {bound}{' or None' if none_ok else ''}; got {value!r}")


@dataclass(frozen=True)
class DataConfig:
    """Synthetic multimodal data. ``batch_size`` is global rows (all devices, all microbatches)."""

    seed: int = 0
    batch_size: int = 16
    seq_len: int = 256
    samples_per_row: int = 1  # packing: each row holds exactly this many samples as separate segments
    # Task -> sampling weight; "image" needs a "vision" encoder, "audio" an "audio" encoder.
    mixture: dict = field(default_factory=lambda: {"image": 1.0})
    # A curriculum: the train stream's first ``mixture_warmup_steps`` steps draw their tasks from ``mixture_warmup``
    # instead (e.g. {"video": 1.0}: videos first); held-out streams always draw from ``mixture``.
    mixture_warmup: dict = field(default_factory=dict)
    mixture_warmup_steps: int = 0
    max_images: int = 1  # encoder instances per sample (rows of encoder_inputs per sample)
    max_audio: int = 1
    audio_fmax: float = 4000.0
    eval_batches: int = 4  # held-out batches (their own random stream) per evaluation
    # A real dataset (DatasetConfig.path set) tokenises its text with this tokenizer.json (Hugging Face tokenizers);
    # the synthetic stream always uses its own word-level tokenizer.
    tokenizer_path: str = ""
    # Which device encodes which image/clip (mllm_jax.data.encoder_balance): "balanced" assigns each step's instances
    # to every device by cost (several processes: metadata exchanged, pixels moved on device); "row_bound" keeps them
    # with their rows' samples.
    encoder_balance: str = "balanced"
    # A folder for frozen encoders' pre-projector features per sample (mllm_jax.data.encoder_cache), so that later
    # epochs and evaluations skip the encoder (train and held-out samples keyed apart); "" for none. Needs
    # epoch_samples (the synthetic stream never repeats a sample without).
    encoder_cache: str = ""
    # The synthetic train stream repeats after this many samples (epochs; sample i is sample i % epoch_samples);
    # 0: an endless stream of new samples.
    epoch_samples: int = 0

    def __post_init__(self):
        for name in ("batch_size", "seq_len", "samples_per_row", "max_images", "max_audio"):
            _check("DataConfig", name, getattr(self, name), low=1, integer=True)
        for name in ("eval_batches", "mixture_warmup_steps", "epoch_samples"):
            _check("DataConfig", name, getattr(self, name), low=0, integer=True)


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with linear warmup then cosine decay to ``end_lr_ratio * learning_rate``; global-norm clipping."""

    learning_rate: float = 1e-3
    warmup_steps: int = 50
    end_lr_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.01
    grad_clip_norm: float | None = 1.0

    def __post_init__(self):
        _check("OptimizerConfig", "learning_rate", self.learning_rate, low=0)  # 0: no updates (a throughput run)
        _check("OptimizerConfig", "warmup_steps", self.warmup_steps, low=0, integer=True)
        _check("OptimizerConfig", "end_lr_ratio", self.end_lr_ratio, low=0)
        _check("OptimizerConfig", "b1", self.b1, low=0, high=1)
        _check("OptimizerConfig", "b2", self.b2, low=0, high=1)
        _check("OptimizerConfig", "eps", self.eps, low=0, low_open=True)
        _check("OptimizerConfig", "weight_decay", self.weight_decay, low=0)
        _check("OptimizerConfig", "grad_clip_norm", self.grad_clip_norm, low=0, low_open=True, none_ok=True)


@dataclass(frozen=True)
class CheckpointConfig:
    every: int | None = None  # None -> TrainConfig.checkpoint_every
    keep: int = 3
    async_save: bool = True


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 500
    checkpoint_every: int = 100
    log_every: int = 10
    eval_every: int = 100  # 0 -> evaluate only at the end
    # Held-out samples greedily captioned at each evaluation (eval_caption_exact, eval_caption_word_accuracy); 0 turns
    # the captioning off (it compiles a prefill and a decode step for the run's layout).
    eval_captions: int = 4
    seed: int = 0  # parameter initialisation
    progress_bar: bool = True  # tqdm, only when stdout is a terminal
    stop_at_step: int | None = None  # end this invocation early at this step with a checkpoint (time-sliced jobs)
    # Start the parameters from an earlier run (mllm_jax.train.init_from): its workdir (newest checkpoint) or one
    # .../checkpoints/<step> directory. Fresh starts only (a checkpoint in this run's workdir wins); parameters only
    # (optimizer, data iterator and step start fresh).
    init_from: str = ""
    # Which parameters to take, as path prefixes of the parameter tree ("encoders", "encoders/vision", "llm");
    # empty: all. The others keep their fresh initialisation (LLaVA stage 1: ("encoders", "llm"), fresh projectors).
    init_modules: tuple = ()
