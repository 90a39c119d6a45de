"""DatasetConfig: which files, which buckets, how a global batch is split into ranks and microbatches.

A plain frozen dataclass like the other configs; ``mllm_jax.gin_setup`` is the one place that registers config
classes with gin (``DatasetConfig.microbatch_assignment = "balanced"`` in a recipe)."""

from __future__ import annotations

from dataclasses import dataclass, field

ASSIGNMENTS = ("balanced", "sequential", "random")
BAD_SAMPLE_POLICIES = ("skip", "raise")
FORMATS = ("llava", "audio_caption")


@dataclass(frozen=True)
class DatasetConfig:
    """A real (file-backed) dataset and its batching.

    A global batch holds ``global_batch_samples`` samples. They are assigned to ``num_data_ranks`` data-parallel ranks
    (ParallelConfig.data * fsdp) and, per rank, to ``ParallelConfig.microbatches`` microbatches; each microbatch is
    packed into ``rows_per_microbatch`` rows whose length is the smallest of ``seq_len_buckets`` that fits every
    microbatch of the global batch, with the smallest of ``instance_buckets`` encoder slots per microbatch and modality.
    """

    format: str = "llava"  # "llava" (conversation JSON + image folder) | "audio_caption" (JSONL)
    path: str = ""  # the JSON / JSONL file
    media_root: str = ""  # image folder (llava) or the base for relative audio paths; "" = the file's directory
    global_batch_samples: int = 32
    rows_per_microbatch: int = 1
    seq_len_buckets: tuple = (512, 1024, 2048, 4096)
    instance_buckets: tuple = (1, 2, 4, 8, 16)  # encoder slots per microbatch and modality
    microbatch_assignment: str = "balanced"  # "balanced" | "sequential" | "random"
    on_bad_sample: str = "skip"  # "skip" (counted, logged) | "raise"
    shuffle: bool = True
    seed: int = 0
    prefetch: int = 2  # global batches prepared ahead by the background thread
    num_workers: int = 4  # threads decoding images / audio
    # Images whose header claims more pixels (width x height) are skipped as "image_too_large" before decoding
    # (and PIL's own decompression-bomb error counts the same).
    max_image_pixels: int = 50_000_000
    refine_iterations: int = 200  # balanced assignment: swap/move passes after the greedy
    image_mean: tuple = (0.48145466, 0.4578275, 0.40821073)  # CLIP's normalisation
    image_std: tuple = (0.26862954, 0.26130258, 0.27577711)
    audio_prompt: str = "Describe the audio."
    # Native-resolution vision (NativeVisionConfig; docs/data.md): the frame rate of a "video" whose record has no
    # "fps" field (0: unknown, every frame is kept, as the processor without a rate), and a directory with a Hugging
    # Face preprocessor_config.json (+ video_preprocessor_config.json) to take the processor from ("": the model's
    # NativeVisionConfig).
    video_fps: float = 0.0
    processor_path: str = ""

    def validate(self) -> "DatasetConfig":
        if self.format not in FORMATS:
            raise ValueError(f"DatasetConfig.format must be one of {FORMATS}; got {self.format!r}")
        if self.microbatch_assignment not in ASSIGNMENTS:
            raise ValueError(
                f"DatasetConfig.microbatch_assignment must be one of {ASSIGNMENTS}; got {self.microbatch_assignment!r}"
            )
        if self.on_bad_sample not in BAD_SAMPLE_POLICIES:
            raise ValueError(f"DatasetConfig.on_bad_sample must be one of {BAD_SAMPLE_POLICIES}; got {self.on_bad_sample!r}")
        if not self.seq_len_buckets or any(int(s) <= 0 for s in self.seq_len_buckets):
            raise ValueError(f"DatasetConfig.seq_len_buckets must be positive lengths; got {self.seq_len_buckets}")
        if not self.instance_buckets or any(int(n) <= 0 for n in self.instance_buckets):
            raise ValueError(f"DatasetConfig.instance_buckets must be positive counts; got {self.instance_buckets}")
        if self.video_fps < 0:
            raise ValueError(f"DatasetConfig.video_fps must be >= 0 (0: unknown); got {self.video_fps}")
        for name in ("global_batch_samples", "rows_per_microbatch", "prefetch", "num_workers", "max_image_pixels"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"DatasetConfig.{name} must be positive; got {getattr(self, name)}")
        return self
