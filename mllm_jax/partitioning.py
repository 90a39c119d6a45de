"""Logical axis names -> shardings, seen from inside the model.

Modules name the axes of every parameter (``param(value, names)``) and of key activations; they know nothing of
meshes. The mapping from logical names to mesh axes is a rule table (a tuple of (name, mesh axes) pairs, built by
``parallel.sharding``) made current with ``rules_scope(rules)``. Without a mesh, or without rules, everything here is
a no-op, so the same model runs on one device, under jit on a mesh, and inside shard_map.

Parameters are *stored* as the rules say (FSDP: sharded over ``fsdp``) and *used* after dropping the mesh axes that
the module's activations use for their batch (``gathered``): an FSDP all-gather right before the matmul, which also
keeps explicit-sharding type checks unambiguous.
"""

from __future__ import annotations

import contextlib
import contextvars
import math

import jax
from flax import nnx
from jax.sharding import AxisType, PartitionSpec as P

Rules = tuple  # ((logical name, mesh axis | tuple of mesh axes | None), ...)

_current_rules: contextvars.ContextVar[Rules | None] = contextvars.ContextVar("mllm_jax_rules", default=None)


@contextlib.contextmanager
def rules_scope(rules: Rules | None):
    """Make ``rules`` the logical-axis table for parameter creation (flax eager sharding) and activation layouts."""
    token = _current_rules.set(rules)
    try:
        if rules is None:
            yield
        else:
            with nnx.logical_axis_rules(rules):
                yield
    finally:
        _current_rules.reset(token)


def current_rules() -> Rules | None:
    return _current_rules.get()


def _mesh():
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh is None or mesh.empty else mesh


def _manual_axes(mesh) -> frozenset:
    """Mesh axes that are Manual here (inside a shard_map over them): the caller owns those, layouts never name them."""
    return frozenset(n for n, t in zip(mesh.axis_names, mesh.axis_types) if t == AxisType.Manual)


def param(value, names: tuple, variable_type=nnx.Param):
    """A parameter carrying logical axis names; sharded at creation only when a mesh and rules are in force."""
    if len(names) != value.ndim:
        raise ValueError(f"parameter of shape {value.shape} given {len(names)} axis names {names}")
    eager = _mesh() is not None and current_rules() is not None
    return variable_type(value, out_sharding=tuple(names), eager_sharding=eager)


def _axes_of(rule) -> tuple:
    if rule is None:
        return ()
    return (rule,) if isinstance(rule, str) else tuple(rule)


def spec(names: tuple, shape: tuple, *, drop: tuple = ()) -> P | None:
    """PartitionSpec for an array with these logical names under the current rules and mesh, or None (no layout).

    Mesh axes of size 1 or not in the mesh, already used by an earlier dimension, listed in ``drop``, or whose product
    would not divide the dimension are left out (so tiny test shapes and uneven encoder batches still shard where they
    can).
    """
    mesh, rules = _mesh(), current_rules()
    if mesh is None or rules is None:
        return None
    table = dict(rules)
    used: set = set(_manual_axes(mesh))
    out = []
    for name, dim in zip(names, shape):
        chosen = []
        size = 1
        for ax in _axes_of(table.get(name)) if name is not None else ():
            if ax not in mesh.axis_names or ax in used or ax in drop or mesh.shape[ax] == 1:
                continue
            n = mesh.shape[ax]
            if dim % (size * n) == 0:
                chosen.append(ax)
                size *= n
        used.update(chosen)
        out.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
    return P(*out)


def _explicit(mesh) -> bool:
    """Every axis the program may lay out is Explicit: the whole mesh, or all but the Manual axes of an enclosing
    shard_map (the pipeline's stages run tensor- and FSDP-sharded layers inside a shard_map over `pipeline`)."""
    free = [t for t in mesh.axis_types if t != AxisType.Manual]
    return bool(free) and all(t == AxisType.Explicit for t in free)


def constrain(x, names: tuple):
    """Lay out an activation by its logical names (reshard on Explicit meshes, a sharding constraint on Auto ones)."""
    s = spec(names, x.shape)
    if s is None:
        return x
    mesh = _mesh()
    if _explicit(mesh):
        return jax.sharding.reshard(x, s)
    if all(t == AxisType.Auto for t in mesh.axis_types):
        return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(mesh, s))
    return x  # every axis manual, or Auto beside Manual: the caller owns the layout


def batch_axes() -> tuple:
    """Mesh axes that the current module's activations use for their batch dimension."""
    rules = current_rules()
    if rules is None:
        return ()
    return _axes_of(dict(rules).get("batch"))


def gathered(x, names: tuple):
    """A parameter as used in compute: its storage layout minus the batch's mesh axes (the FSDP all-gather)."""
    mesh = _mesh()
    if mesh is None or not _explicit(mesh):
        return x
    s = spec(names, x.shape, drop=batch_axes())
    return x if s is None else jax.sharding.reshard(x, s)


def unshard_leading(x):
    """``x`` with its leading dimension replicated (its other dimensions keep their layout): stacked layers stored
    in per-device blocks over `pipeline`, gathered for a ``lax.scan`` over them outside the pipeline (evaluation,
    the plain loss). A no-op off Explicit meshes and where the leading dimension is not sharded."""
    mesh = _mesh()
    if mesh is None or not _explicit(mesh) or x.ndim == 0:
        return x
    current = getattr(jax.typeof(x), "sharding", None)
    spec = list(current.spec) if current is not None else []
    if not spec or spec[0] is None:
        return x
    return jax.sharding.reshard(x, P(None, *spec[1:]))


def out_sharding(names: tuple, shape: tuple):
    """``out_sharding=`` for einsum/gather on Explicit meshes (None elsewhere)."""
    mesh = _mesh()
    if mesh is None or not _explicit(mesh):
        return None
    return spec(names, shape)


def take_rows(table, index, names: tuple):
    """``table[index]`` (rows of a [N, D] table at int ``index`` of any shape) laid out by the output's logical
    names: an embedding lookup or a feature gather. On Explicit meshes the gather's output sharding is spelled out."""
    sh = out_sharding(names, tuple(index.shape) + tuple(table.shape[1:]))
    return jax.numpy.take(table, index, axis=0) if sh is None else table.at[index].get(out_sharding=sh)


def reshape(x, shape: tuple, names: tuple):
    """``x.reshape(shape)`` laid out by the output's logical names.

    On Explicit meshes jax refuses to guess the layout of most reshapes of a sharded array (e.g. splitting the
    unsharded H, W of a batch-sharded image), so the output sharding is spelled out; lay ``x`` out first so that its
    sharded dimensions are the ones ``names`` keeps (no data moves).
    """
    sh = out_sharding(names, tuple(shape))
    return x.reshape(shape) if sh is None else jax.numpy.reshape(x, shape, out_sharding=sh)


def variable_names(state) -> object:
    """The logical names of every variable of an nnx State, as a pytree of tuples (None where unannotated)."""
    return jax.tree.map(
        lambda v: tuple(v.get_metadata().get("out_sharding") or ()) or None,
        state,
        is_leaf=lambda v: isinstance(v, nnx.Variable),
    )


def prod(xs) -> int:
    return math.prod(xs)
