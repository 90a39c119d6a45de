"""Where attention runs on a mesh: the current mesh's shape, and running a per-device kernel per shard under
``jax.shard_map``.

The tiled path and the Pallas kernels work on whole local arrays (their loops and grids index the batch; a Pallas call
cannot be partitioned by XLA), so on a mesh that shards the batch or heads ``per_shard`` runs them under shard_map:
each device attends its own batch rows and heads, the sequence whole (context parallelism, which splits the
sequence, is kernels.context_parallel). Dense attention partitions like any einsum and needs none of this.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from mllm_jax.kernels.meta import TokenMeta


def current_mesh():
    """The abstract mesh in force (jax.set_mesh / inside shard_map), or None."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh is None or mesh.empty else mesh


def free_axes(mesh) -> tuple:
    """The mesh axes of size > 1 that are not already manual (inside a shard_map those are whole per device)."""
    return tuple(n for n, s, t in zip(mesh.axis_names, mesh.axis_sizes, mesh.axis_types)
                 if s > 1 and t != AxisType.Manual)


def unmanaged_axes(mesh) -> tuple:
    """Every mesh axis not already manual, size 1 included: a shard_map around a Pallas call must be manual over all
    of them (the TPU compiler refuses a Mosaic call in a region still automatic over a size-1 axis)."""
    return tuple(n for n, t in zip(mesh.axis_names, mesh.axis_types) if t != AxisType.Manual)


def context_mesh(axis: str = "context"):
    """The current mesh when its ``axis`` has size > 1 and is not manual yet (attention then runs context-parallel)."""
    mesh = current_mesh()
    return mesh if mesh is not None and axis in free_axes(mesh) else None


def sharded_mesh():
    """The current mesh when some axis that is not manual has size > 1 (arrays may be split over devices), else None."""
    mesh = current_mesh()
    return mesh if mesh is not None and free_axes(mesh) else None


def kernel_mesh(*, pallas: bool):
    """The mesh a per-device kernel must run per shard on (``per_shard``), or None to call it directly.

    Any kernel when arrays may be split (``sharded_mesh``). A Pallas call also inside a shard_map that left some axes
    automatic, even of size 1 (a pipeline stage: manual over `pipeline`, the rest size 1): the TPU compiler refuses a
    Mosaic call anywhere that is not manual over every axis."""
    mesh = current_mesh()
    if mesh is None:
        return None
    if free_axes(mesh):
        return mesh
    partly_manual = 0 < len(unmanaged_axes(mesh)) < len(mesh.axis_names)
    return mesh if pallas and partly_manual else None


def axis_names(axes) -> tuple:
    return () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))


def axes_size(mesh, axes) -> int:
    return math.prod(mesh.shape[a] for a in axis_names(axes))


def spec_entry(x, dim):
    """The mesh axes that already shard ``dim`` of x (explicit-sharding meshes), else None."""
    try:
        spec = jax.typeof(x).sharding.spec
    except Exception:  # noqa: BLE001 - abstract values without a sharding (Auto meshes) carry no spec
        return None
    return spec[dim] if dim < len(spec) else None


def place(x, mesh, spec):
    """On explicit-sharding meshes shard_map requires inputs already in its in_specs: reshard when they differ."""
    if not any(t == AxisType.Explicit for t in mesh.axis_types):
        return x
    try:
        current = tuple(jax.typeof(x).sharding.spec)
    except Exception:  # noqa: BLE001
        current = None
    want = tuple(spec) + (None,) * (x.ndim - len(spec))
    if current is not None and tuple(current) + (None,) * (x.ndim - len(current)) == want:
        return x
    return jax.reshard(x, NamedSharding(mesh, P(*want)))


def per_shard(kernel, q, k, v, q_meta: TokenMeta, k_meta: TokenMeta, mesh):
    """kernel(q, k, v, q_meta, k_meta) on each device's batch rows and heads, under shard_map over ``mesh``.

    The batch and head axes are those that already shard q (explicit meshes); heads stay whole when the key/value
    heads do not divide over them. The sequence is whole per device (resharded if it was split).
    """
    batch_axes, head_axes = spec_entry(q, 0), spec_entry(q, 2)
    if q.shape[2] % axes_size(mesh, head_axes) or k.shape[2] % axes_size(mesh, head_axes):
        head_axes = None
    x_spec, m_spec = P(batch_axes, None, head_axes, None), P(batch_axes, None)
    meta_spec = TokenMeta(m_spec, m_spec, m_spec)
    q, k, v = (place(x, mesh, x_spec) for x in (q, k, v))
    q_meta, k_meta = (TokenMeta(*(place(jnp.asarray(a, jnp.int32), mesh, m_spec) for a in m)) for m in (q_meta, k_meta))
    # check_vma=False: the kernel may be a pallas_call, whose outputs carry no varying-axes type.
    return jax.shard_map(kernel, mesh=mesh, in_specs=(x_spec, x_spec, x_spec, meta_spec, meta_spec), out_specs=x_spec,
                         axis_names=set(unmanaged_axes(mesh)), check_vma=False)(q, k, v, q_meta, k_meta)
