"""mllm_jax: the model library (encoders, projectors, LLM, MultimodalModel, freezing/LoRA)."""

from mllm_jax.audio import AudioEncoder
from mllm_jax.batch import check_batch
from mllm_jax.config import (
    AudioConfig, LLMConfig, LoRAConfig, ModelConfig, NativeVisionConfig, ProjectorConfig, RopeScaling, RunSettings,
    VisionConfig,
)
from mllm_jax.freeze import trainable_filter
from mllm_jax.llm import LLM
from mllm_jax.multimodal import MultimodalModel, num_features
from mllm_jax.native_vision import NativeVisionEncoder
from mllm_jax.projector import Projector
from mllm_jax.vision import VisionEncoder

__all__ = [
    "AudioConfig", "AudioEncoder", "LLM", "LLMConfig", "LoRAConfig", "ModelConfig", "MultimodalModel",
    "NativeVisionConfig", "NativeVisionEncoder", "Projector", "ProjectorConfig", "RopeScaling", "RunSettings", "VisionConfig", "VisionEncoder", "check_batch", "num_features",
    "trainable_filter",
]
