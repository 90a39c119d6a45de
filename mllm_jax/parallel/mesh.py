"""The device mesh: axes (data, fsdp, pipeline, context, tensor), validated before anything compiles."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType

from mllm_jax.parallel.config import MESH_AXES, ParallelConfig


def validate(parallel_config: ParallelConfig, num_devices: int) -> None:
    sizes = parallel_config.axis_sizes
    bad = {a: s for a, s in sizes.items() if not isinstance(s, int) or s < 1}
    if bad:
        raise ValueError(f"mesh axis sizes must be positive integers; got {bad}")
    if parallel_config.num_devices != num_devices:
        desc = " x ".join(f"{a}={s}" for a, s in sizes.items())
        raise ValueError(f"mesh axes {desc} = {parallel_config.num_devices} devices, but {num_devices} devices "
                         f"are available")


def validate_model(parallel_config: ParallelConfig, model_config) -> None:
    """Refuse layouts the model cannot take: heads / kv_heads not divisible by ``tensor``."""
    t = parallel_config.tensor
    llm = model_config.llm
    for what, n in (("n_heads", llm.n_heads), ("n_kv_heads", llm.n_kv_heads)):
        if n % t:
            raise ValueError(f"LLM {what} ({n}) must be divisible by the tensor axis size ({t})")
    if parallel_config.pipeline > 1 and llm.n_layers < parallel_config.pipeline:
        raise ValueError(f"LLM n_layers ({llm.n_layers}) is fewer than the pipeline stages "
                         f"({parallel_config.pipeline})")


def make_mesh(parallel_config: ParallelConfig, devices=None):
    """jax.make_mesh over ``devices`` (default: all) with Explicit axes named as in parallel.config.MESH_AXES."""
    devices = list(jax.devices() if devices is None else devices)
    validate(parallel_config, len(devices))
    shape = tuple(parallel_config.axis_sizes[a] for a in MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Explicit,) * len(MESH_AXES),
                         devices=np.asarray(devices).ravel().tolist())
