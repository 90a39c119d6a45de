"""Registers every config dataclass with gin under its class name, and parses recipes.

Registration uses ``gin.external_configurable`` (a configurable subclass), so the dataclasses themselves are left
untouched for code that builds them directly. ``resolve`` turns what gin built back into the plain classes (recursing
into dicts and nested configs), so configs compare equal and pickle the same whichever way they were made.
"""

from __future__ import annotations

import dataclasses
import os

import gin

from mllm_jax import config as model_config
from mllm_jax.train import config as train_config
from mllm_jax.data.datasets.config import DatasetConfig
from mllm_jax.parallel import config as parallel_config

CONFIG_CLASSES = (
    model_config.RopeScaling, model_config.LLMConfig, model_config.VisionConfig, model_config.NativeVisionConfig,
    model_config.AudioConfig,
    model_config.ProjectorConfig, model_config.LoRAConfig, model_config.ModelConfig,
    parallel_config.ContextConfig, parallel_config.ParallelConfig,
    train_config.DataConfig, train_config.OptimizerConfig, train_config.CheckpointConfig, train_config.TrainConfig,
    DatasetConfig,  # real-data loader (mllm_jax.data.datasets)
)

_REGISTERED: dict[type, type] = {}
_SEARCH_PATHS: set[str] = set()


def register() -> dict[type, type]:
    """Idempotent: plain class -> its gin-configurable subclass."""
    if not _REGISTERED:
        for cls in CONFIG_CLASSES:
            _REGISTERED[cls] = gin.external_configurable(cls, name=cls.__name__)
    return _REGISTERED


def _plain_class(obj_cls: type) -> type:
    for plain in CONFIG_CLASSES:
        if obj_cls is plain or obj_cls is _REGISTERED.get(plain):
            return plain
    return obj_cls


def resolve(obj):
    """Recursively rebuild dataclass configs as their plain classes (tuples for lists, so configs stay hashable)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        cls = _plain_class(type(obj))
        return cls(**{f.name: resolve(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init})
    if isinstance(obj, dict):
        return {k: resolve(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return tuple(resolve(v) for v in obj)
    return obj


def build(cls: type):
    """Instantiate ``cls`` with the gin bindings in force, returned as the plain class."""
    return resolve(register()[cls]())


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository (configs/ lives here)


def resolve_gin_file(path: str) -> str:
    """Where a --gin_file is: as given (relative to the working directory, or absolute), else under the repository's
    configs/, else under the repository root (a repo-relative 'configs/x.gin' run from elsewhere); '.gin' may be left
    off. A FileNotFoundError names every place looked and the recipes that exist."""
    path = os.fspath(path)
    names = [path] if path.endswith(".gin") else [path, path + ".gin"]
    places = []
    for name in names:
        for base in (os.getcwd(), os.path.join(ROOT, "configs"), ROOT):
            full = os.path.abspath(os.path.join(base, name))
            if full not in places:
                places.append(full)
    for full in places:
        if os.path.isfile(full):
            return full
    recipes = sorted(f"configs/{f}" for f in os.listdir(os.path.join(ROOT, "configs")) if f.endswith(".gin"))
    raise FileNotFoundError(f"gin file {path!r} not found; looked in: {', '.join(places)}. Recipes in the "
                            f"repository: {', '.join(recipes)}")


def parse(gin_files=(), gin_params=()) -> None:
    """Parse recipes then overrides, replacing whatever an earlier parse bound (each call describes one whole run).
    Each recipe path goes through ``resolve_gin_file``. An unknown configurable or parameter is a ValueError naming
    it (gin's own)."""
    register()
    files = [resolve_gin_file(f) for f in (gin_files or ())]  # every file checked before any is parsed
    gin.clear_config()
    # Recipes include each other by repo-relative path ('configs/vlm_tiny.gin'), whatever the working directory.
    if ROOT not in _SEARCH_PATHS:
        gin.add_config_file_search_path(ROOT)
        _SEARCH_PATHS.add(ROOT)
    gin.parse_config_files_and_bindings(files, list(gin_params or ()), finalize_config=False)


def config_str() -> str:
    return gin.config_str()
