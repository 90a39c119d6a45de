"""Pipeline runtime: one jit, layers stacked and sharded over the `pipeline` mesh axis, the schedule as data.

The schedule is a numpy table [tick, stage] of ops with the microbatch and the buffer slots each op reads and each
arriving message is written to (``parallel.schedule``: 1F1B, ZB-H1, GPipe). The runtime (``pipeline_value_and_grad``)
scans over the table's rows inside ``jax.shard_map`` over `pipeline`: each device reads its column, runs its op
under ``lax.switch`` (real control flow inside shard_map), and exchanges activations (forward) and input cotangents
(backward) with its neighbours by ``ppermute`` every tick.

Backward per stage is an explicit vjp with rematerialisation per layer: a stage's forward keeps each of its slots'
input per microbatch in flight, and its backward walks its layers in reverse, each slot's vjp recomputing that
layer's forward from its saved input (``layer_grads``), by the frozen rule: nothing (frozen, nothing upstream
trains), dX only (frozen, something upstream trains), dW only (trainable, nothing upstream trains), dX + dW; dW of
the trainable parameter leaves only (``param_trainable``: LoRA's adapters, not its base weights). The backward runs
fused (BW: one vjp per layer) or split (B: dX only, keeping each trainable layer's output cotangent; W later: dW
only), so the op costs are the planner's (``parallel.pipeline_plan.runtime_layer_ops``). Stages whose layers all
need nothing skip the backward; the last stage computes the loss and its cotangent in its forward op. Ticks run in
lockstep (each ends in the ppermutes), so a step takes the sum over ticks of the slowest stage's op: the planner
simulates exactly that table (``parallel.schedule.simulate``), and ``trace=True`` returns what each stage ran in
each tick, to check it.

Uneven stages are padded to the largest with an inactive slot per missing layer; parameters travel in the canonical
[layers, ...] layout and are gathered to / scattered from [stages, slots, ...] inside the jit. A stage walks only its
own slots: its loops' trip count is the stage's active layer count (data, not a shape), so padding costs no compute,
only the padded slots' memory. Memory: one pool of activation slots per device (saved inputs, and for ZB-H1 the kept
cotangents of a deferred W) sized by the schedule; a weight-gradient accumulator with rows for the slots that have a
weight gradient only (``StageLayout.grad_rows``), none when no layer trains, none for frozen leaves; with
``gather_params`` the stage's weights as the layers use them (e.g. FSDP-gathered in the compute dtype), made once per
step before the tick loop instead of per layer and op.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from mllm_jax.parallel.schedule import (FIELDS, OP_B, OP_BW, OP_CHARS, OP_F, OP_FB, OP_IDLE, OP_SKIP, OP_W, SCHEDULES,
                                        Schedule, build_schedule, stage_op_order)

# Older names of the ops (the fused backward was the only one).
OP_FWD, OP_BWD, OP_BWD_SKIP = OP_F, OP_BW, OP_SKIP
__all__ = ["FIELDS", "OP_B", "OP_BW", "OP_F", "OP_FB", "OP_IDLE", "OP_SKIP", "OP_W", "SCHEDULES", "Schedule",
           "build_schedule",
           "layout_schedule", "make_layout", "pipeline_value_and_grad", "sequential_value_and_grad", "stage_op_order"]

# Slot kinds: which backward a layer slot runs.
KIND_NONE, KIND_DX, KIND_DW, KIND_DX_DW = 0, 1, 2, 3
# Per-tick trace columns (``pipeline_value_and_grad(trace=True)``): what a stage ran in that tick, counted in its
# loops: layer forwards, layer forwards recomputed inside vjps (remat), layer input gradients, layer weight gradients.
TRACE_FIELDS = ("forward_layers", "recomputes", "input_grads", "weight_grads")


@dataclass(frozen=True)
class StageLayout:
    """Canonical layers -> [stages, slots]: ``index`` [S, L_max] (layer per slot, 0 where padded), ``active``
    [S, L_max], ``kind`` [S, L_max] (KIND_*), ``backward_stages`` [S]."""

    stage_layers: tuple
    index: np.ndarray
    active: np.ndarray
    kind: np.ndarray
    backward_stages: np.ndarray

    @property
    def stages(self) -> int:
        return len(self.stage_layers)

    @property
    def slots(self) -> int:
        return self.index.shape[1]

    @property
    def weight_stages(self) -> np.ndarray:
        """[S] bool: the stage has a layer with a weight gradient (trainable base weights or adapters)."""
        return (self.active & ((self.kind == KIND_DW) | (self.kind == KIND_DX_DW))).any(axis=1)

    @property
    def trains(self) -> bool:
        return bool(self.weight_stages.any())

    @property
    def grad_slots(self) -> np.ndarray:
        """[S, L_max] bool: the slots with a weight gradient (their rows of the gradient accumulator, in order)."""
        return self.active & (self.kind >= KIND_DW)

    @property
    def grad_rows(self) -> int:
        """Rows of every device's gradient accumulator: the most slots with a weight gradient on one stage (frozen
        slots get none, so a stage of mostly frozen layers does not size it by its layer count)."""
        return max(1, int(self.grad_slots.sum(axis=1).max()))


def layout_schedule(layout: StageLayout, microbatches: int, kind: str = "1f1b") -> Schedule:
    """The table the runtime executes for ``layout`` (the planner prices the same one: schedule.simulate)."""
    return build_schedule(layout.stages, microbatches, backward_stages=layout.backward_stages,
                          weight_stages=layout.weight_stages, kind=kind)


def make_layout(stage_layers, trainable_layers=None, *, input_requires_grad=False, loss_params_trainable=True):
    """``stage_layers``: layers per stage (uneven allowed, each >= 1). ``trainable_layers``: bool per layer (None =
    all). ``input_requires_grad``: the pipeline input depends on trainable parameters (projectors, embedding), so
    every layer must pass dX back."""
    counts = [int(c) for c in stage_layers]
    if not counts or min(counts) < 1:
        raise ValueError(f"stage_layers must be >= 1 layer per stage; got {tuple(stage_layers)}")
    n = sum(counts)
    tr = np.ones(n, bool) if trainable_layers is None else np.asarray(trainable_layers, bool)
    if tr.shape != (n,):
        raise ValueError(f"trainable_layers must have {n} entries (sum of stage_layers); got shape {tr.shape}")
    upstream = np.concatenate([[input_requires_grad], np.cumsum(tr)[:-1] > 0]) | input_requires_grad
    layer_kind = np.where(tr, np.where(upstream, KIND_DX_DW, KIND_DW), np.where(upstream, KIND_DX, KIND_NONE))
    S, L = len(counts), max(counts)
    index = np.zeros((S, L), np.int32)
    active = np.zeros((S, L), bool)
    kind = np.zeros((S, L), np.int32)
    start = 0
    for s, c in enumerate(counts):
        index[s, :c] = np.arange(start, start + c)
        active[s, :c] = True
        kind[s, :c] = layer_kind[start : start + c]
        start += c
    backward = (kind > 0).any(axis=1)
    if loss_params_trainable:
        backward[-1] = True
    # A stage before one that needs dX back has ... nothing to do unless its own layers need a backward: kinds
    # already encode that (a stage upstream of the first trainable layer is KIND_NONE throughout).
    return StageLayout(tuple(counts), index, active, kind, backward)


def _is_uniform(layout: StageLayout) -> bool:
    return bool(layout.active.all())


def _spec_of(a) -> list:
    try:
        spec = list(jax.typeof(a).sharding.spec)
    except AttributeError:
        spec = []
    return spec + [None] * (a.ndim - len(spec))


def _sharded_over(a, dim: int, axis: str) -> bool:
    entry = _spec_of(a)[dim]
    return entry is not None and axis in (entry if isinstance(entry, tuple) else (entry,))


def to_stages(stacked, layout: StageLayout, mesh=None, axis="pipeline"):
    """[layers, ...] -> [stages, slots, ...] (padded slots hold a copy of layer 0; they are inactive).

    Stored layers may already be sharded over ``axis`` in contiguous blocks (the LLM's ``layers`` rule under
    pipeline parallelism): for a uniform split each device's block *is* its stage, so the reshape moves nothing;
    an uneven split gathers the layers over ``axis`` first (a transient copy) and takes each stage's slots."""
    S, L = layout.index.shape

    def one(a):
        if mesh is not None and _sharded_over(a, 0, axis):
            spec = _spec_of(a)
            if _is_uniform(layout) and spec[0] == axis:  # blocks of `axis` alone: each device's block is its stage
                return jnp.reshape(a, (S, L) + a.shape[1:], out_sharding=NamedSharding(mesh, P(axis, None, *spec[1:])))
            a = _reshard_dim(a, mesh, None, axis)
        idx = jnp.asarray(layout.index.reshape(-1))
        return jnp.take(a, idx, axis=0).reshape((S, L) + a.shape[1:])

    return jax.tree.map(one, stacked)


def from_stages(staged, layout: StageLayout, mesh=None, axis="pipeline"):
    """[stages, slots, ...] -> [layers, ...], dropping the padded slots. With a mesh: for a uniform split the layers
    stay sharded over ``axis`` in contiguous blocks (the storage layout of pipelined LLM layers), else they are
    replicated over ``axis`` first (the canonical layout does not depend on the plan)."""
    flat = jnp.asarray(np.flatnonzero(layout.active.reshape(-1)))  # in layer order: stages are contiguous

    def one(a):
        if mesh is not None and _is_uniform(layout):
            a = _reshard_dim(a, mesh, 0, axis)
            spec = _spec_of(a)
            return jnp.reshape(a, (-1,) + a.shape[2:], out_sharding=NamedSharding(mesh, P(axis, *spec[2:])))
        if mesh is not None:
            a = _reshard_dim(a, mesh, None, axis)
        return jnp.take(a.reshape((-1,) + a.shape[2:]), flat, axis=0)

    return jax.tree.map(one, staged)


def _reshard_dim(a, mesh, dim, axis):
    """Shard dimension ``dim`` of ``a`` over ``axis`` (None: replicate over ``axis``), keeping its sharding over the
    other mesh axes (data / fsdp / tensor stay as the caller laid them out)."""
    a = jnp.asarray(a)
    spec = _spec_of(a)

    def drop(entry):
        if entry is None:
            return None
        names = tuple(n for n in (entry if isinstance(entry, tuple) else (entry,)) if n != axis)
        return None if not names else (names[0] if len(names) == 1 else names)

    spec = [drop(e) for e in spec]
    if dim is not None:
        spec[dim] = axis
    target = NamedSharding(mesh, P(*spec))
    if getattr(jax.typeof(a), "sharding", None) == target:
        return a
    return jax.reshard(a, target)


def _zeros_like(tree):
    return jax.tree.map(jnp.zeros_like, tree)


def _keep_layout(layer_fn):
    """A layer's output keeps its input's sharding over the non-pipeline axes (scan and cond need equal types;
    a tensor-parallel layer may hand back a differently sharded activation)."""

    def fn(p, h, aux_m):
        out = layer_fn(p, h, aux_m)
        want = getattr(jax.typeof(h), "sharding", None)
        if want is not None and getattr(jax.typeof(out), "sharding", None) != want:
            out = jax.sharding.reshard(out, want.spec)
        return out

    return fn


def _stage_forward(layer_fn, params_L, n_active, x, aux_m, saved=None, slot=0, cnt=None):
    """Run slots 0 .. ``n_active`` - 1 (a traced bound: the loop's trip count is data, so the padded slots of a shorter
    stage are never visited). ``saved`` [act_slots, L_max + 1, ...]: when given, slot i's input is written to
    ``saved[slot, i]`` in place (the backward's per-layer rematerialisation starts from these). ``cnt``: the trace
    counter (int32[len(TRACE_FIELDS)]) or None. Returns (y, saved, cnt)."""

    def body(i, carry):
        h, buf, c = carry
        if buf is not None:
            buf = jax.lax.dynamic_update_slice(buf, h[None, None], (slot, i) + (0,) * h.ndim)
        if c is not None:
            c = c.at[0].add(1)
        return layer_fn(_index(params_L, i), h, aux_m), buf, c

    return jax.lax.fori_loop(0, n_active, body, (x, saved, cnt))


def _row(buf, slot, i):
    """buf[slot, i] with traced indices."""
    return jax.lax.dynamic_slice(buf, (slot, i) + (0,) * (buf.ndim - 2), (1, 1) + buf.shape[2:])[0, 0]


class ParamSplit:
    """Which leaves of one layer's parameters train (LoRA: the adapters, not the base weights): the weight-gradient
    vjps differentiate those leaves only, and only they get an accumulator, so a frozen leaf has no dW computed and no
    gradient buffer."""

    def __init__(self, layer_params, param_trainable=None):
        leaves, self.treedef = jax.tree.flatten(layer_params)
        if param_trainable is None:
            self.mask = (True,) * len(leaves)
        else:
            mask, tdef = jax.tree.flatten(param_trainable)
            if tdef != self.treedef:
                raise ValueError(f"param_trainable must have the structure of one layer's parameters {self.treedef}; "
                                 f"got {tdef}")
            self.mask = tuple(bool(m) for m in mask)

    def split(self, p) -> tuple:
        leaves = jax.tree.leaves(p)
        return ([a for a, m in zip(leaves, self.mask) if m], [a for a, m in zip(leaves, self.mask) if not m])

    def merge(self, train, frozen):
        it_t, it_f = iter(train), iter(frozen)
        return jax.tree.unflatten(self.treedef, [next(it_t) if m else next(it_f) for m in self.mask])


def layer_grads(layer_fn, p, x, g, aux_m, *, dx: bool, dw: bool, split: ParamSplit | None = None):
    """One layer's backward from its saved input ``x`` and output cotangent ``g``, by the frozen rule: the vjp with
    respect to the input only (``dx``), the trainable parameter leaves only (``dw``), or both; the forward is
    recomputed inside (remat per layer). Returns (list of the trainable leaves' gradients or None, dx or None)."""
    if not (dx or dw):
        return None, None
    split = split or ParamSplit(p)
    train, frozen = split.split(p)
    if dw and dx:
        _, vjp = jax.vjp(lambda q, h: layer_fn(split.merge(q, frozen), h, aux_m), train, x)
        dq, dh = vjp(g)
        return dq, dh
    if dw:
        _, vjp = jax.vjp(lambda q: layer_fn(split.merge(q, frozen), x, aux_m), train)
        return vjp(g)[0], None
    _, vjp = jax.vjp(lambda h: layer_fn(p, h, aux_m), x)
    return None, vjp(g)[0]


def _add_grad(acc, row, dq):
    """acc[:][row] += dq. A gradient taken with respect to the gathered copy of the weights (``gather_params``)
    comes back in the accumulator's dtype and storage layout: the transpose of the cast and the gather (a cast and a
    reduce-scatter, what the per-layer gather's vjp does too)."""

    def into(a, d):
        d = d.astype(a.dtype)
        want = _spec_of(a)[1:]
        if _spec_of(d) != want:
            d = jax.sharding.reshard(d, P(*want))
        return d

    return [jax.lax.dynamic_update_index_in_dim(a, a[row] + into(a, d), row, 0) for a, d in zip(acc, dq)]


def _stage_backward(layer_fn, params_L, kind_L, n_active, n_none, saved, slot, dy, aux_m, gacc, cnt=None,
                    split=None, rows=None):
    """The fused backward (BW): reverse walk over the active slots with the per-slot vjp branch (each recomputes its
    layer's forward from the input the forward saved in ``saved[slot, i]``: remat per layer, no second pass over the
    stage), adding each slot's trainable-leaf gradients into ``gacc`` (list of [L_max, ...]; None: no layer of the
    pipeline trains, so no branch takes dW); returns (gacc, dx, cnt). Slots below ``n_none`` (KIND_NONE: frozen with
    nothing trainable upstream, always a prefix) and padded slots are not visited."""

    def body(j, carry):
        g, acc, c = carry
        i = n_active - 1 - j
        p, k = _index(params_L, i), kind_L[i]
        x = _row(saved, slot, i)
        # Zeros shaped and laid out like the trainable leaves (branch outputs must match in sharding too).
        zeros = None if acc is None else [jnp.zeros_like(a) for a in (split or ParamSplit(p)).split(p)[0]]

        def none():
            return zeros, g

        def dx_only():
            return zeros, layer_grads(layer_fn, p, x, g, aux_m, dx=True, dw=False, split=split)[1]

        def dw_only():
            return layer_grads(layer_fn, p, x, g, aux_m, dx=False, dw=True, split=split)[0], g

        def both():
            return layer_grads(layer_fn, p, x, g, aux_m, dx=True, dw=True, split=split)

        branches = (none, dx_only) if acc is None else (none, dx_only, dw_only, both)
        dq, dx = jax.lax.switch(jnp.minimum(k, len(branches) - 1), branches)
        if acc is not None:
            acc = _add_grad(acc, i if rows is None else rows[i], dq)
        if c is not None:
            c = c + jnp.stack([0, k > KIND_NONE, (k == KIND_DX) | (k == KIND_DX_DW), k >= KIND_DW]).astype(c.dtype)
        return dx, acc, c

    dx, gacc, cnt = jax.lax.fori_loop(0, n_active - n_none, body, (dy, gacc, cnt))
    return gacc, dx, cnt


def _stage_input_grad(layer_fn, params_L, kind_L, n_active, n_none, acts, slot, w_slot, dy, aux_m, cnt=None):
    """B: the input gradient only. Reverse walk as in the fused backward, but each slot takes dX only (its vjp with
    respect to the input: no dW is computed), and a slot with a weight gradient keeps the cotangent of its output in
    ``acts[w_slot, i]`` for the W op. Returns (acts, dx, cnt)."""

    def body(j, carry):
        g, buf, c = carry
        i = n_active - 1 - j
        p, k = _index(params_L, i), kind_L[i]
        buf = jax.lax.cond(k >= KIND_DW,
                           lambda: jax.lax.dynamic_update_slice(buf, g[None, None], (w_slot, i) + (0,) * g.ndim),
                           lambda: buf)
        x = _row(buf, slot, i)
        has_dx = (k == KIND_DX) | (k == KIND_DX_DW)
        g = jax.lax.cond(has_dx, lambda: layer_grads(layer_fn, p, x, g, aux_m, dx=True, dw=False)[1], lambda: g)
        if c is not None:
            c = c + jnp.stack([0, has_dx, has_dx, 0]).astype(c.dtype)
        return g, buf, c

    dx, acts, cnt = jax.lax.fori_loop(0, n_active - n_none, body, (dy, acts, cnt))
    return acts, dx, cnt


def _stage_weight_grad(layer_fn, params_L, kind_L, n_active, n_none, acts, slot, w_slot, aux_m, gacc, cnt=None,
                       split=None, rows=None):
    """W: the weight gradient only, of the slots that have one: each one's vjp with respect to its trainable leaves
    (no dX), from its saved input ``acts[slot, i]`` and the output cotangent B kept in ``acts[w_slot, i]``."""

    def body(i, carry):
        acc, c = carry
        has_dw = kind_L[i] >= KIND_DW

        def dw():
            dq, _ = layer_grads(layer_fn, _index(params_L, i), _row(acts, slot, i), _row(acts, w_slot, i), aux_m,
                                dx=False, dw=True, split=split)
            return _add_grad(acc, i if rows is None else rows[i], dq)

        acc = jax.lax.cond(has_dw, dw, lambda: acc)
        if c is not None:
            c = c + jnp.stack([0, has_dw, 0, has_dw]).astype(c.dtype)
        return acc, c

    return jax.lax.fori_loop(n_none, n_active, body, (gacc, cnt))


def _index(tree, i):
    return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, 0, keepdims=False), tree)


def pipeline_value_and_grad(
    layer_fn,
    stacked_params,
    x_microbatches,
    *,
    loss_fn,
    loss_params,
    stage_layers,
    mesh,
    aux=None,
    trainable_layers=None,
    input_requires_grad=False,
    loss_params_trainable=True,
    axis: str = "pipeline",
    schedule: str = "1f1b",
    trace: bool = False,
    param_trainable=None,
    gather_params=None,
):
    """Loss and gradients of a layer stack run as a pipeline. Call inside jit (or let it jit itself by wrapping).

    layer_fn(layer_params, x, aux_m) -> x: one layer; x [mb, ...] keeps its shape and dtype.
    stacked_params: pytree with leading [layers] axis (canonical layout). x_microbatches [M, mb, ...].
    loss_fn(loss_params, y, aux_m) -> scalar loss *sum* of one microbatch (the caller divides by the global count).
    aux: pytree with leading [M] (labels, token metadata), given to layer_fn and loss_fn per microbatch.
    stage_layers: layers per stage (mesh.shape[axis] entries). trainable_layers: bool per layer.
    param_trainable: bools with the structure of one layer's parameters (None: every leaf): which leaves of a
    trainable layer train (LoRA: the adapters); the others get no dW computed and a zero gradient.
    schedule: one of ``schedule.SCHEDULES`` ("1f1b", "zb_h1", "1f1b_fb", "gpipe").
    gather_params(stage_params) -> stage_params: the stage's parameters ([slots, ...] leaves, as stored) as its
    layers use them, e.g. cast to the compute dtype and FSDP-gathered. Called once per step on each device, before
    the tick loop; every op of the step runs on its output, and the weight gradients, taken with respect to it, are
    cast and laid out back into the storage layout's accumulator as they are added (a reduce-scatter per layer and
    backward). None: the layers get the parameters as stored (``layer_fn`` gathers what it needs itself).

    Returns (loss_sum, (grads_stacked [layers, ...], grads_loss_params, dx_microbatches or None)); frozen layers
    get zero gradients (no buffer inside the pipeline when no layer trains); dx_microbatches is computed only with
    ``input_requires_grad``. ``trace=True`` adds a third output: int32 [ticks, stages, len(TRACE_FIELDS)], the layer
    forwards / input-gradient vjps / weight-gradient vjps each stage ran in each tick (counted inside the loops).
    """
    S = mesh.shape[axis]
    if len(stage_layers) != S:
        raise ValueError(f"stage_layers has {len(stage_layers)} stages but mesh axis {axis!r} has {S} devices")
    n_layers = jax.tree.leaves(stacked_params)[0].shape[0]
    if sum(stage_layers) != n_layers:
        raise ValueError(f"stage_layers {tuple(stage_layers)} sum to {sum(stage_layers)}; params have {n_layers}")
    M = x_microbatches.shape[0]
    layout = make_layout(
        stage_layers,
        trainable_layers,
        input_requires_grad=input_requires_grad,
        loss_params_trainable=loss_params_trainable,
    )
    sched = layout_schedule(layout, M, schedule)
    want_dx = bool(input_requires_grad)
    # One layer's structure only (a[0] of a stack sharded over `pipeline` cannot be sliced on an Explicit mesh).
    one_layer = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), stacked_params)
    split = ParamSplit(one_layer, param_trainable)
    if not any(split.mask):  # nothing in a layer trains: the layers are frozen whatever trainable_layers says
        layout = make_layout(stage_layers, np.zeros(n_layers, bool), input_requires_grad=input_requires_grad,
                             loss_params_trainable=loss_params_trainable)
        sched = layout_schedule(layout, M, schedule)
    per_device = _stage_program(_keep_layout(layer_fn), loss_fn, layout, sched, x_microbatches, axis, want_dx, trace,
                                split, gather_params)
    stage_spec = P(axis)
    fn = jax.shard_map(
        per_device,
        mesh=mesh,
        in_specs=(stage_spec, stage_spec, stage_spec, P(None, axis), stage_spec, P(), P(), P()),
        out_specs=(stage_spec, P(), P(), P(), P(None, axis)),
        axis_names=frozenset({axis}),
        check_vma=False,
    )
    lead = lambda a: _reshard_dim(a, mesh, 0, axis)  # noqa: E731
    gstaged, glp, loss, dx, counts = fn(
        jax.tree.map(lead, to_stages(stacked_params, layout, mesh, axis)),
        lead(jnp.asarray(layout.active)),
        lead(jnp.asarray(layout.kind)),
        _reshard_dim(jnp.asarray(sched.table), mesh, 1, axis),  # [T, S, F]: each device reads its column
        lead(jnp.arange(S, dtype=jnp.int32)),
        *(jax.tree.map(lambda a: _reshard_dim(a, mesh, None, axis), t)
          for t in (x_microbatches, {} if aux is None else aux, loss_params)),
    )
    # No layer trains: no accumulator was carried; zeros here cost nothing where the caller drops them.
    zeros = jax.tree.leaves(jax.tree.map(jnp.zeros_like, stacked_params))
    trained = iter(_grads_to_layers(gstaged, layout, mesh, axis) if layout.trains else [])
    grads = jax.tree.unflatten(split.treedef, [next(trained) if m and layout.trains else z
                                                for z, m in zip(zeros, split.mask)])
    out = (loss, (grads, glp, dx if want_dx else None))
    return out + (counts,) if trace else out


def _grads_to_layers(gstaged, layout: StageLayout, mesh, axis) -> list:
    """[stages, grad_rows, ...] accumulators -> [layers, ...] per leaf: the rows of the slots with a weight gradient
    in layer order, zeros for the layers without one."""
    G = layout.grad_rows
    rows = np.zeros((layout.stages, G), bool)
    for s, n in enumerate(layout.grad_slots.sum(axis=1)):
        rows[s, :n] = True
    row_layout = StageLayout(tuple(int(n) for n in rows.sum(axis=1)), np.zeros_like(rows, np.int32), rows,
                             np.zeros_like(rows, np.int32), layout.backward_stages)
    got = jax.tree.leaves(from_stages(gstaged, row_layout, mesh, axis))  # [n with a weight gradient, ...]
    n_layers = int(layout.active.sum())
    has = np.zeros(n_layers, bool)
    has[layout.index[layout.grad_slots]] = True
    if has.all():
        return got
    # Some layers are frozen: their rows are zeros (one more row to point at), gathered in layer order.
    where = np.where(has, np.cumsum(has) - 1, int(has.sum()))
    out = []
    for g in got:
        g = _reshard_dim(g, mesh, None, axis) if mesh is not None else g
        g = jnp.concatenate([g, jnp.zeros_like(g[:1])], axis=0)
        out.append(jnp.take(g, jnp.asarray(where), axis=0))
    return out


def _stage_program(layer_fn, loss_fn, layout: StageLayout, sched: Schedule, x_microbatches, axis: str,
                   want_dx: bool, trace: bool = False, split: ParamSplit | None = None, gather_params=None):
    """The per-device body of the pipeline's shard_map: one stage scanning its column of the schedule table, each
    tick its op under ``lax.switch`` (idle / F / B / W / BW / F+BW / skip), then the ppermutes to its neighbours. Returns
    (its slots' parameter gradients, loss-parameter gradients and loss summed over stages, its input-gradient buffer
    (stage 0's: the others are zero), its per-tick trace)."""
    S, M = layout.stages, x_microbatches.shape[0]
    mb_shape = x_microbatches.shape[1:]
    fwd_perm = [(i, i + 1) for i in range(S - 1)]
    bwd_perm = [(i + 1, i) for i in range(S - 1)]
    trains = layout.trains

    def per_device(params_L, active_L, kind_L, table_T, stage, x_mb, aux_all, lp):
        stored_L = jax.tree.map(lambda a: a[0], params_L)
        # The copy the ops use: as stored, or gathered once here for the whole step (``gather_params``).
        params_L = stored_L if gather_params is None else gather_params(stored_L)
        active_L, kind_L, table_T, stage = active_L[0], kind_L[0], table_T[:, 0], stage[0]
        last = stage == S - 1
        L = layout.slots
        # Active slots are a prefix of the stage, and so are its KIND_NONE slots among them.
        n_active = jnp.sum(active_L.astype(jnp.int32))
        n_none = jnp.sum((active_L & (kind_L == KIND_NONE)).astype(jnp.int32))
        # Slot -> its row of the gradient accumulator (the slots with a weight gradient, in order).
        rows_L = jnp.maximum(jnp.cumsum((active_L & (kind_L >= KIND_DW)).astype(jnp.int32)) - 1, 0)
        G = layout.grad_rows
        # Buffers inherit the microbatch's sharding over the other mesh axes (explicit axes must match in selects).
        zero_x = jnp.zeros_like(x_mb[0])
        buffer = lambda k: jnp.broadcast_to(zero_x[None], (k,) + mb_shape)  # noqa: E731

        # An op maps the stage's state (acts, gacc, lpacc, loss, dxs, cnt) to (what it sends, the new state).
        def fwd(st, gs, slot, m0):
            acts, gacc, lpacc, loss, dxs, cnt = st
            aux_m = _index(aux_all, m0)
            # Every slot's input is kept for the backward (row 0 is where the previous stage's activation arrived).
            # A stage without a backward writes into a slot that nobody reads.
            x = jnp.where(stage == 0, x_mb[m0], acts[slot, 0])
            y, new_acts, cnt = _stage_forward(layer_fn, params_L, n_active, x, aux_m, saved=acts, slot=slot, cnt=cnt)

            def loss_now():
                # The last stage takes the loss and its cotangent in its forward (its backward is then the layers'
                # vjps only); the cotangent waits in the slot's spare row L_max.
                value, vjp = jax.vjp(lambda yy, q: loss_fn(q, yy, aux_m), y, lp)
                dy, dlp = vjp(jnp.ones_like(value))
                kept = jax.lax.dynamic_update_slice(new_acts, dy[None, None], (slot, L) + (0,) * dy.ndim)
                return zero_x, kept, jax.tree.map(jnp.add, lpacc, dlp), loss + value.astype(jnp.float32)

            def send():
                return y, new_acts, lpacc, loss

            y, new_acts, lpacc, loss = jax.lax.cond(last, loss_now, send)
            return y, (new_acts, gacc, lpacc, loss, dxs, cnt)

        def incoming(acts, gs, slot, gslot):
            return jnp.where(last, acts[slot, L], gs[jnp.maximum(gslot, 0)])

        def input_grad(dxs, dx, m0):
            if not want_dx:
                return dxs
            return jax.lax.cond(stage == 0, lambda: dxs.at[m0].set(dx), lambda: dxs)

        def bwd_fused(st, gs, slot, gslot, m0):
            acts, gacc, lpacc, loss, dxs, cnt = st
            gacc, dx, cnt = _stage_backward(layer_fn, params_L, kind_L, n_active, n_none, acts, slot,
                                            incoming(acts, gs, slot, gslot), _index(aux_all, m0), gacc, cnt, split,
                                            rows_L)
            return dx, (acts, gacc, lpacc, loss, input_grad(dxs, dx, m0), cnt)

        def bwd_input(st, gs, slot, gslot, w_slot, m0):
            acts, gacc, lpacc, loss, dxs, cnt = st
            acts, dx, cnt = _stage_input_grad(layer_fn, params_L, kind_L, n_active, n_none, acts, slot, w_slot,
                                              incoming(acts, gs, slot, gslot), _index(aux_all, m0), cnt)
            return dx, (acts, gacc, lpacc, loss, input_grad(dxs, dx, m0), cnt)

        def bwd_weight(st, slot, w_slot, m0):
            acts, gacc, lpacc, loss, dxs, cnt = st
            if not trains:
                return st
            gacc, cnt = _stage_weight_grad(layer_fn, params_L, kind_L, n_active, n_none, acts, slot, w_slot,
                                           _index(aux_all, m0), gacc, cnt, split, rows_L)
            return acts, gacc, lpacc, loss, dxs, cnt

        def tick(carry, row):
            acts, gs, gacc, lpacc, loss, dxs = carry
            f = dict(zip(FIELDS, (row[i] for i in range(len(FIELDS)))))
            m0, m2 = jnp.maximum(f["mb"], 0), jnp.maximum(f["mb2"], 0)
            slot, w_slot, slot2 = (jnp.maximum(f[k], 0) for k in ("x_slot", "w_slot", "x2_slot"))
            gslot = f["g_slot"]
            st = (acts, gacc, lpacc, loss, dxs, jnp.zeros((len(TRACE_FIELDS),), jnp.int32) if trace else None)

            def idle():
                return zero_x, zero_x, st

            def op_f():
                y, new = fwd(st, gs, slot, m0)
                return y, zero_x, new

            def op_b():
                dx, new = bwd_input(st, gs, slot, gslot, w_slot, m0)
                return zero_x, dx, new

            def op_w():
                return zero_x, zero_x, bwd_weight(st, slot, w_slot, m0)

            def op_bw():
                dx, new = bwd_fused(st, gs, slot, gslot, m0)
                return zero_x, dx, new

            def op_fb():  # the forward half first: the last stage's backward may read the cotangent it just made
                y, mid = fwd(st, gs, slot, m0)
                dx, new = bwd_fused(mid, gs, slot2, gslot, m2)
                return y, dx, new

            branches = [idle] * len(OP_CHARS)
            branches[OP_F], branches[OP_B], branches[OP_W], branches[OP_BW], branches[OP_FB] = (
                op_f, op_b, op_w, op_bw, op_fb)
            y, dx, (acts, gacc, lpacc, loss, dxs, cnt) = jax.lax.switch(f["op"], branches)
            acts, gs = _receive(acts, gs, jax.lax.ppermute(y, axis, fwd_perm), jax.lax.ppermute(dx, axis, bwd_perm),
                                f["recv_x_slot"], f["recv_g_slot"])
            return (acts, gs, gacc, lpacc, loss, dxs), cnt

        init = (
            # One pool of activation slots: saved layer inputs (+ the last stage's cotangent row), or for zb_h1 the
            # kept layer-output cotangents of a deferred W.
            jnp.broadcast_to(zero_x[None, None], (sched.act_slots, L + 1) + mb_shape),
            buffer(sched.g_slots),
            # Rows for the slots with a weight gradient only (``StageLayout.grad_rows``), trainable leaves only.
            # In the storage layout and dtype (FSDP-sharded, float32), whatever copy the ops use.
            [jnp.zeros_like(a[:G]) for a in split.split(stored_L)[0]] if trains else None,
            _zeros_like(lp),
            jnp.float32(0.0),
            buffer(M) if want_dx else jnp.zeros((), x_mb.dtype),
        )
        (_, _, gacc, lpacc, loss, dxs), counts = jax.lax.scan(tick, init, table_T)
        # Only the last stage has a loss and loss-parameter gradients, only stage 0 an input gradient.
        total = lambda t: jax.tree.map(lambda a: jax.lax.psum(a, axis), t)  # noqa: E731
        gout = jax.tree.map(lambda a: a[None], gacc) if trains else jnp.zeros((1,), jnp.int32)
        counts = (counts if trace else jnp.zeros((table_T.shape[0], len(TRACE_FIELDS)), jnp.int32))[:, None]
        return gout, total(lpacc), total(loss), jax.tree.map(lambda a: _from_one_stage(a, axis), dxs), counts

    return per_device


def _from_one_stage(a, axis: str):
    """Every stage's copy of a buffer that one stage wrote and the others hold as zeros (stage 0's input gradient):
    a psum over ``axis``. 16-bit floats are summed as their bits (uint16: x + 0 + ... + 0 is x exactly, in the same
    bytes): XLA:CPU's all-reduce promotion of a bfloat16 psum fails to compile here (an invalid copy opcode)."""
    if jnp.issubdtype(a.dtype, jnp.floating) and jnp.dtype(a.dtype).itemsize == 2:
        bits = jax.lax.psum(jax.lax.bitcast_convert_type(a, jnp.uint16), axis)
        return jax.lax.bitcast_convert_type(bits, a.dtype)
    return jax.lax.psum(a, axis)


def _receive(acts, gs, y_in, g_in, rx, rg):
    """Store what arrived at the end of a tick: the previous stage's activation in row 0 of activation slot ``rx``,
    the next stage's cotangent in g slot ``rg`` (-1: nothing arrived)."""
    acts = jax.lax.cond(
        rx >= 0,
        lambda: jax.lax.dynamic_update_slice(acts, y_in[None, None], (jnp.maximum(rx, 0), 0) + (0,) * y_in.ndim),
        lambda: acts,
    )
    gs = jax.lax.cond(rg >= 0, lambda: gs.at[jnp.maximum(rg, 0)].set(g_in), lambda: gs)
    return acts, gs


def sequential_value_and_grad(layer_fn, stacked_params, x_microbatches, *, loss_fn, loss_params, aux=None):
    """One-device oracle: the same loss sum by plain autodiff over every layer and microbatch."""
    aux = {} if aux is None else aux

    def total(params, lp, xm):
        def one(x, aux_m):
            def body(h, p):
                return layer_fn(p, h, aux_m), None

            y, _ = jax.lax.scan(body, x, params)
            return loss_fn(lp, y, aux_m)

        return jax.vmap(one)(xm, aux).sum()

    loss, (g, glp, gx) = jax.value_and_grad(total, argnums=(0, 1, 2))(stacked_params, loss_params, x_microbatches)
    return loss, (g, glp, gx)
