"""A layout written for any slice: one mesh axis given as -1 takes the devices the others leave (MaxText's
convention), and ``microbatches=-1`` takes one row per data x fsdp shard per microbatch. Recipes use it so that the
same file runs on 1 CPU device, a 4-chip v5p slice or a 64-chip pod; the filled sizes are printed by train.py."""

from __future__ import annotations

import dataclasses

from mllm_jax.parallel.config import MESH_AXES, DeviceCountError, ParallelConfig

FILL = -1


def fill_layout(pc: ParallelConfig, num_devices: int, batch_size: int | None = None) -> ParallelConfig:
    """``pc`` with its -1 sizes resolved for ``num_devices`` devices and a global batch of ``batch_size`` rows (None:
    microbatches must not be -1). Sizes that are not -1 are returned as given (mesh.validate checks them)."""
    sizes = pc.axis_sizes
    fill = [a for a, s in sizes.items() if s == FILL]
    if len(fill) > 1:
        raise ValueError(f"at most one ParallelConfig mesh axis may be -1 (fill with the devices left); got "
                         f"{', '.join(f'{a}=-1' for a in fill)}")
    if fill:
        rest = 1
        for a in MESH_AXES:
            if a != fill[0]:
                rest *= sizes[a] if sizes[a] > 0 else 1
        if num_devices % rest:
            given = " x ".join(f"{a}={s}" for a, s in sizes.items() if a != fill[0])
            raise DeviceCountError(f"ParallelConfig.{fill[0]}=-1 fills the devices left, but the other axes "
                                   f"({given} = {rest}) do not divide the {num_devices} devices")
        pc = dataclasses.replace(pc, **{fill[0]: num_devices // rest})
    if pc.microbatches == FILL:
        shards = pc.data * pc.fsdp * pc.expert  # the batch axes (distributed.BATCH_AXES)
        if batch_size is None:
            raise ValueError("ParallelConfig.microbatches=-1 (one row per data x fsdp shard per microbatch) needs the "
                             "synthetic data's DataConfig.batch_size; give ParallelConfig.microbatches for a real "
                             "dataset (DatasetConfig.path)")
        if batch_size % shards:
            raise ValueError(f"ParallelConfig.microbatches=-1 (one row per data x fsdp x expert shard per microbatch) "
                             f"needs a batch divisible by data x fsdp = {pc.data} x {pc.fsdp} = {pc.data * pc.fsdp} "
                             f"times expert={pc.expert} ({shards} shards); got batch_size {batch_size}")
        pc = dataclasses.replace(pc, microbatches=batch_size // shards)
    return pc
