"""Deprecated: moved to mllm_jax.data.datasets (issue 15: data under one roof). This alias goes in a later release."""

import importlib
import sys
import warnings

from mllm_jax.data.datasets import *  # noqa: F401,F403
from mllm_jax.data.datasets import __all__  # noqa: F401

warnings.warn("mllm_jax.datasets moved to mllm_jax.data.datasets", DeprecationWarning, stacklevel=2)
for _sub in ("balance", "config", "loader", "media", "packing", "sample", "sources", "text", "workload"):
    sys.modules[f"{__name__}.{_sub}"] = importlib.import_module(f"mllm_jax.data.datasets.{_sub}")
