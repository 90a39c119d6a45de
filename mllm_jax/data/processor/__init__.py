"""The multimodal processor: tokenizers, chat templates, image/audio preprocessing like the HF processors, and
placeholder expansion into contract batches (docs/contracts.md)."""

from mllm_jax.data.processor.audio import WhisperFeatures, mel_filter_bank
from mllm_jax.data.processor.chat import TEMPLATES, ChatTemplate, get_template
from mllm_jax.data.processor.gemma3 import Gemma3ImageProcessor, Gemma3Prompt
from mllm_jax.data.processor.image import ImageProcessor
from mllm_jax.data.processor.multimodal import IGNORE, EncodedSample, MultimodalProcessor
from mllm_jax.data.processor.tokenizer import Tokenizer, load_tokenizer

__all__ = ["WhisperFeatures", "mel_filter_bank", "TEMPLATES", "ChatTemplate", "get_template", "Gemma3ImageProcessor",
           "Gemma3Prompt", "ImageProcessor", "IGNORE",
           "EncodedSample", "MultimodalProcessor", "Tokenizer", "load_tokenizer"]
