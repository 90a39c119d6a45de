"""Deprecated: moved to mllm_jax.data.processor (issue 15: data under one roof). This alias goes in a later release."""

import importlib
import sys
import warnings

from mllm_jax.data.processor import *  # noqa: F401,F403
from mllm_jax.data.processor import __all__  # noqa: F401

warnings.warn("mllm_jax.processor moved to mllm_jax.data.processor", DeprecationWarning, stacklevel=2)
for _sub in ("audio", "chat", "image", "multimodal", "tokenizer"):
    sys.modules[f"{__name__}.{_sub}"] = importlib.import_module(f"mllm_jax.data.processor.{_sub}")
