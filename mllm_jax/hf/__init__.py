"""Hugging Face interop: config.json <-> our configs, safetensors streaming into sharded NNX modules, and export."""

from mllm_jax.hf.config_map import SUPPORTED_TYPES, config_from_hf
from mllm_jax.hf.pretrained import load_pretrained, read_config, save_pretrained
from mllm_jax.hf.recipe import PretrainedConfig, create_pretrained_model, resolve_model_config

__all__ = ["SUPPORTED_TYPES", "config_from_hf", "load_pretrained", "read_config", "save_pretrained", "PretrainedConfig",
           "create_pretrained_model", "resolve_model_config"]
