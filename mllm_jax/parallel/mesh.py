"""The device mesh: axes (data, fsdp, expert, pipeline, context, tensor), validated before anything compiles."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType

from mllm_jax.parallel.config import MESH_AXES, DeviceCountError, ParallelConfig


def validate(parallel_config: ParallelConfig, num_devices: int | None = None) -> None:
    """Refuse axis sizes that are not positive integers, fewer than one microbatch, and (``num_devices`` given) a
    mesh whose size is not the device count. The model's part of a layout: mllm_jax.layout.validate_layout."""
    sizes = parallel_config.axis_sizes
    bad = {a: s for a, s in sizes.items() if not isinstance(s, int) or s < 1}
    if bad:
        raise ValueError(f"mesh axis sizes must be positive integers; got {bad}")
    mb = parallel_config.microbatches
    if not isinstance(mb, int) or mb < 1:
        raise ValueError(f"ParallelConfig.microbatches must be an integer >= 1 here (-1 and \"auto\" are resolved by "
                         f"train.loop.for_devices); got {mb!r}")
    if num_devices is not None and parallel_config.num_devices != num_devices:
        desc = " x ".join(f"{a}={s}" for a, s in sizes.items())
        raise DeviceCountError(f"mesh axes {desc} = {parallel_config.num_devices} devices, but {num_devices} are "
                               f"available; make the product of ParallelConfig sizes equal {num_devices}")


def make_mesh(parallel_config: ParallelConfig, devices=None):
    """jax.make_mesh over ``devices`` (default: all) with Explicit axes named as in parallel.config.MESH_AXES."""
    devices = list(jax.devices() if devices is None else devices)
    validate(parallel_config, len(devices))
    shape = tuple(parallel_config.axis_sizes[a] for a in MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Explicit,) * len(MESH_AXES),
                         devices=np.asarray(devices).ravel().tolist())
