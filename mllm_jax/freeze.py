"""Trainable flags -> an nnx filter, so ``nnx.Optimizer(model, tx, wrt=trainable_filter(config))`` keeps optimizer
state only for what trains. A module with LoRA adapters trains its adapters only (base weights frozen)."""

from __future__ import annotations

from flax import nnx

from mllm_jax import lora as lora_lib
from mllm_jax.config import ModelConfig
from mllm_jax.layers import LoRAParam


def module_key(path: tuple) -> str:
    """"llm", "encoders/<name>" or "projectors/<name>" from a parameter path of MultimodalModel."""
    parts = [str(getattr(p, "key", p)) for p in path]
    if parts and parts[0] in ("encoders", "projectors") and len(parts) > 1:
        return f"{parts[0]}/{parts[1]}"
    return parts[0] if parts else ""


def _lora_module(key: str) -> str:
    return "llm" if key == "llm" else key.split("/", 1)[1] if key.startswith("encoders/") else ""


def trainable_filter(config: ModelConfig):
    """nnx filter: True for the parameters that train under ``config.trainable`` and ``config.lora``."""

    def is_trainable(path, value) -> bool:
        if not isinstance(value, nnx.Param):
            return False
        key = module_key(path)
        if isinstance(value, LoRAParam):
            return True
        if lora_lib.lora_for(config, _lora_module(key)) is not None:
            return False  # base weights of an adapted module stay frozen
        return config.is_trainable(key)

    return is_trainable


def frozen_filter(config: ModelConfig):
    keep = trainable_filter(config)
    return lambda path, value: isinstance(value, nnx.Param) and not keep(path, value)
