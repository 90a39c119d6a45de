"""Real (file-backed) datasets: LLaVA conversation JSON and JSONL audio captions, sequence packing into static
buckets, workload-balanced assignment of samples to data ranks and microbatches, and a checkpointable host-sharded
loader with background prefetch. Synthetic data, the synthetic tokenizer and its batches live in mllm_jax.data."""

from mllm_jax.data.datasets.balance import (Capacity, assign, coefficient_of_variation, microbatch_loads,
                                       predicted_step_time)
from mllm_jax.data.datasets.config import DatasetConfig
from mllm_jax.data.datasets.loader import Loader, local_data_ranks
from mllm_jax.data.datasets.packing import PackedBatchWriter, pack_rows
from mllm_jax.data.datasets.sample import BadSampleError, BadSampleLog, PreparedSample, Sample
from mllm_jax.data.datasets.sources import (AudioCaptionSource, Gemma3LlavaSource, LlavaSource, NativeLlavaSource,
                                            make_source)
from mllm_jax.data.datasets.text import ConversationEncoder
from mllm_jax.data.datasets.workload import WorkloadModel

__all__ = ["Capacity", "assign", "coefficient_of_variation", "microbatch_loads", "predicted_step_time",
           "DatasetConfig", "Loader", "local_data_ranks", "PackedBatchWriter", "pack_rows", "BadSampleError",
           "BadSampleLog", "PreparedSample", "Sample", "AudioCaptionSource", "LlavaSource", "NativeLlavaSource",
           "Gemma3LlavaSource", "make_source",
           "ConversationEncoder", "WorkloadModel"]
