"""Hugging Face interop: config.json <-> our configs, safetensors streaming into sharded NNX modules, and export."""

from mllm_jax.hf.config_map import SUPPORTED_TYPES, config_from_hf
from mllm_jax.hf.pretrained import load_pretrained, read_config, save_pretrained

__all__ = ["SUPPORTED_TYPES", "config_from_hf", "load_pretrained", "read_config", "save_pretrained"]
