"""1F1B pipeline runtime: one jit, layers stacked and sharded over the `pipeline` mesh axis, the schedule as data.

The schedule is a numpy table [time, stage] of ops (forward / backward / idle) with the microbatch and the buffer
slots each op reads and each arriving message is written to (``build_schedule``). The runtime
(``pipeline_value_and_grad``) scans over the table's rows inside ``jax.shard_map`` over `pipeline`: each device
reads its column, runs its op under ``lax.switch`` (real control flow inside shard_map), and exchanges activations
(forward) and input cotangents (backward) with its neighbours by ``ppermute`` every tick.

Backward per stage is an explicit vjp with rematerialisation per layer: a stage's forward keeps each of its slots'
input per microbatch in flight (at most `stages` under 1F1B), and its backward walks its layers in reverse, each
slot's vjp recomputing that layer's forward from its saved input, with one of four branches per layer: nothing
(frozen, nothing upstream trains), dX only (frozen, something upstream trains), dW only (trainable, nothing upstream
trains), dX + dW. So a forward op costs the sum of its layers' forwards and a backward op the sum of f + dX / dW per
layer: exactly the cost model's remat=True costs (``parallel.pipeline_plan.runtime_stage_costs``). Stages whose
layers all need nothing skip the backward entirely; the last stage computes the loss and its cotangent in its
forward op (its backward op is then its layers' vjps only). Ticks run in lockstep (each ends in the ppermutes), so a
step takes the sum over ticks of the slowest stage's op: the planner simulates exactly that.

Uneven stages are padded to the largest with an inactive slot per missing layer; parameters travel in the canonical
[layers, ...] layout and are gathered to / scattered from [stages, slots, ...] inside the jit. A stage walks only its
own slots: its forward and backward are loops whose trip count is the stage's active layer count (data, not a shape),
so padding costs no compute, only the padded slots' memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

OP_IDLE, OP_FWD, OP_BWD, OP_BWD_SKIP = 0, 1, 2, 3
# Columns of the schedule table.
FIELDS = ("op", "mb", "x_slot", "g_slot", "recv_x_slot", "recv_g_slot")

# Slot kinds: which backward a layer slot runs.
KIND_NONE, KIND_DX, KIND_DW, KIND_DX_DW = 0, 1, 2, 3


@dataclass(frozen=True)
class Schedule:
    """table int32 [time, stages, len(FIELDS)]; -1 = none. x_slots / g_slots: buffer sizes per device."""

    table: np.ndarray
    x_slots: int
    g_slots: int
    kind: str

    def column(self, field: str) -> np.ndarray:
        return self.table[:, :, FIELDS.index(field)]

    @property
    def ops(self) -> np.ndarray:
        return self.column("op")


def stage_op_order(stages: int, microbatches: int, kind: str = "1f1b") -> list:
    """Per stage, the ordered list of (op, microbatch). 1F1B: stage s runs min(stages - s - 1, M) warm-up forwards,
    then alternates one forward and one backward, then the remaining backwards. GPipe: all forwards, then all
    backwards."""
    orders = []
    for s in range(stages):
        if kind == "gpipe":
            orders.append([(OP_FWD, m) for m in range(microbatches)] + [(OP_BWD, m) for m in range(microbatches)])
            continue
        if kind != "1f1b":
            raise ValueError(f"schedule kind must be '1f1b' or 'gpipe'; got {kind!r}")
        warm = min(stages - s - 1, microbatches)
        order = [(OP_FWD, m) for m in range(warm)]
        nf, nb = warm, 0
        while nb < microbatches:
            if nf < microbatches:
                order.append((OP_FWD, nf))
                nf += 1
            order.append((OP_BWD, nb))
            nb += 1
        orders.append(order)
    return orders


def build_schedule(stages: int, microbatches: int, *, backward_stages=None, kind: str = "1f1b") -> Schedule:
    """Assign each stage's ops to ticks as early as their dependencies allow (a forward needs the previous stage's
    forward of that microbatch at an earlier tick; a backward needs the next stage's backward, or on the last stage
    its own forward), then allocate buffer slots: an activation occupies an x slot from its arrival until the
    stage's backward of that microbatch, a cotangent a g slot from arrival to use. ``backward_stages[s]`` False marks
    a stage with no backward (frozen prefix): its backward ops stay in the table as OP_BWD_SKIP to keep the pace
    (so nothing piles up downstream) but compute and send nothing."""
    if stages < 1 or microbatches < 1:
        raise ValueError(f"stages and microbatches must be >= 1; got {stages} and {microbatches}")
    bw = np.ones(stages, bool) if backward_stages is None else np.asarray(backward_stages, bool)
    if bw.shape != (stages,):
        raise ValueError(f"backward_stages must have {stages} entries; got {bw.shape}")
    orders = stage_op_order(stages, microbatches, kind)
    done_f = np.full((stages, microbatches), -1)
    done_b = np.full((stages, microbatches), -1)
    pos = [0] * stages
    rows = []
    t = 0
    while any(pos[s] < len(orders[s]) for s in range(stages)):
        row = [(OP_IDLE, -1)] * stages
        for s in range(stages):
            if pos[s] >= len(orders[s]):
                continue
            op, m = orders[s][pos[s]]
            if op == OP_FWD:
                ready = s == 0 or 0 <= done_f[s - 1, m] < t
            else:
                ready = (0 <= done_f[s, m] < t) if s == stages - 1 else (0 <= done_b[s + 1, m] < t)
            if ready:
                row[s] = (op if (op == OP_FWD or bw[s]) else OP_BWD_SKIP, m)
                pos[s] += 1
        for s, (op, m) in enumerate(row):
            if op == OP_FWD:
                done_f[s, m] = t
            elif op in (OP_BWD, OP_BWD_SKIP):
                done_b[s, m] = t
        rows.append(row)
        t += 1
        if t > 4 * (stages + microbatches) * 2:
            raise AssertionError("schedule did not converge")  # unreachable for 1F1B / GPipe orders

    T = len(rows)
    table = np.full((T, stages, len(FIELDS)), -1, np.int32)
    x_slot_of = [dict() for _ in range(stages)]  # microbatch -> slot
    g_slot_of = [dict() for _ in range(stages)]
    x_free = [set() for _ in range(stages)]
    g_free = [set() for _ in range(stages)]
    x_count = [0] * stages
    g_count = [0] * stages

    def alloc(free, count, s):
        if free[s]:
            slot = min(free[s])
            free[s].remove(slot)
            return slot
        count[s] += 1
        return count[s] - 1

    for t, row in enumerate(rows):
        for s, (op, m) in enumerate(row):
            table[t, s, 0] = op
            table[t, s, 1] = m
            if op == OP_FWD:
                if s == 0 and bw[s]:  # stage 0 reads the input directly; keep it for its backward
                    x_slot_of[s][m] = alloc(x_free, x_count, s)
                if m in x_slot_of[s]:
                    table[t, s, 2] = x_slot_of[s][m]
                    if not bw[s]:  # no backward: the slot is free once the forward has read it
                        x_free[s].add(x_slot_of[s].pop(m))
            elif op == OP_BWD:
                table[t, s, 2] = x_slot_of[s][m]
                x_free[s].add(x_slot_of[s].pop(m))
                if s < stages - 1:
                    table[t, s, 3] = g_slot_of[s][m]
                    g_free[s].add(g_slot_of[s].pop(m))
        # Messages sent this tick arrive at its end, after every op of the tick has read its buffers.
        for s, (op, m) in enumerate(row):
            if op == OP_FWD and s + 1 < stages:
                slot = alloc(x_free, x_count, s + 1)
                x_slot_of[s + 1][m] = slot
                table[t, s + 1, 4] = slot
            if op == OP_BWD and s > 0 and bw[s - 1]:
                slot = alloc(g_free, g_count, s - 1)
                g_slot_of[s - 1][m] = slot
                table[t, s - 1, 5] = slot
    return Schedule(table, max(1, max(x_count)), max(1, max(g_count)), kind)


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


def _stage_forward(layer_fn, params_L, n_active, x, aux_m, saved=None, slot=0):
    """Run slots 0 .. ``n_active`` - 1 (a traced bound: the loop's trip count is data, so the padded slots of a shorter
    stage are never visited). ``saved`` [x_slots, L_max + 1, ...]: when given, slot i's input is written to
    ``saved[slot, i]`` in place (the backward's per-layer rematerialisation starts from these). Returns (y, saved)."""

    def body(i, carry):
        h, buf = carry
        if buf is not None:
            buf = jax.lax.dynamic_update_slice(buf, h[None, None], (slot, i) + (0,) * h.ndim)
        return layer_fn(_index(params_L, i), h, aux_m), buf

    return jax.lax.fori_loop(0, n_active, body, (x, saved))


def _stage_backward(layer_fn, params_L, kind_L, n_active, n_none, saved, slot, dy, aux_m, gacc):
    """Reverse walk over the active slots with the per-slot vjp branch (each recomputes its layer's forward from the
    input the forward saved in ``saved[slot, i]``: remat per layer, no second pass over the stage), adding each
    slot's parameter gradient into ``gacc`` [L_max, ...]; returns (gacc, dx). Slots below ``n_none`` (KIND_NONE:
    frozen with nothing trainable upstream, always a prefix) and padded slots are not visited."""

    def body(j, carry):
        g, acc = carry
        i = n_active - 1 - j
        p, k = _index(params_L, i), kind_L[i]
        x = jax.lax.dynamic_slice(saved, (slot, i) + (0,) * (saved.ndim - 2), (1, 1) + saved.shape[2:])[0, 0]

        def none():
            return _zeros_like(p), g

        def dx_only():
            _, vjp = jax.vjp(lambda h: layer_fn(p, h, aux_m), x)
            return _zeros_like(p), vjp(g)[0]

        def dw_only():
            _, vjp = jax.vjp(lambda q: layer_fn(q, x, aux_m), p)
            return vjp(g)[0], g

        def both():
            _, vjp = jax.vjp(lambda q, h: layer_fn(q, h, aux_m), p, x)
            return vjp(g)

        dp, dx = jax.lax.switch(k, (none, dx_only, dw_only, both))
        acc = jax.tree.map(
            lambda a, d: jax.lax.dynamic_update_index_in_dim(a, a[i] + d.astype(a.dtype), i, 0), acc, dp
        )
        return dx, acc

    dx, gacc = jax.lax.fori_loop(0, n_active - n_none, body, (dy, gacc))
    return gacc, dx


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
):
    """Loss and gradients of a layer stack run as a pipeline. Call inside jit (or let it jit itself by wrapping).

    layer_fn(layer_params, x, aux_m) -> x: one layer; x [mb, ...] keeps its shape and dtype.
    stacked_params: pytree with leading [layers] axis (canonical layout). x_microbatches [M, mb, ...].
    loss_fn(loss_params, y, aux_m) -> scalar loss *sum* of one microbatch (the caller divides by the global count).
    aux: pytree with leading [M] (labels, token metadata), given to layer_fn and loss_fn per microbatch.
    stage_layers: layers per stage (mesh.shape[axis] entries). trainable_layers: bool per layer.

    Returns (loss_sum, (grads_stacked [layers, ...], grads_loss_params, dx_microbatches or None)); frozen layers
    get zero gradients; dx_microbatches is computed only with ``input_requires_grad``.
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
    sched = build_schedule(S, M, backward_stages=layout.backward_stages, kind=schedule)
    want_dx = bool(input_requires_grad)
    per_device = _stage_program(_keep_layout(layer_fn), loss_fn, layout, sched, x_microbatches, axis, want_dx)
    stage_spec = P(axis)
    fn = jax.shard_map(
        per_device,
        mesh=mesh,
        in_specs=(stage_spec, stage_spec, stage_spec, P(None, axis), stage_spec, P(), P(), P()),
        out_specs=(stage_spec, P(), P(), P()),
        axis_names=frozenset({axis}),
        check_vma=False,
    )
    lead = lambda a: _reshard_dim(a, mesh, 0, axis)  # noqa: E731
    gstaged, glp, loss, dx = fn(
        jax.tree.map(lead, to_stages(stacked_params, layout, mesh, axis)),
        lead(jnp.asarray(layout.active)),
        lead(jnp.asarray(layout.kind)),
        _reshard_dim(jnp.asarray(sched.table), mesh, 1, axis),  # [T, S, F]: each device reads its column
        lead(jnp.arange(S, dtype=jnp.int32)),
        *(jax.tree.map(lambda a: _reshard_dim(a, mesh, None, axis), t)
          for t in (x_microbatches, {} if aux is None else aux, loss_params)),
    )
    return loss, (from_stages(gstaged, layout, mesh, axis), glp, dx if want_dx else None)


def _stage_program(layer_fn, loss_fn, layout: StageLayout, sched: Schedule, x_microbatches, axis: str,
                   want_dx: bool):
    """The per-device body of the pipeline's shard_map: one stage scanning its column of the schedule table, each
    tick its op under ``lax.switch`` (idle / forward / backward), then the ppermutes to its neighbours. Returns
    (its slots' parameter gradients, and, summed over stages: loss-parameter gradients, loss, input gradients)."""
    S, M = layout.stages, x_microbatches.shape[0]
    mb_shape, dtype = x_microbatches.shape[1:], x_microbatches.dtype
    fwd_perm = [(i, i + 1) for i in range(S - 1)]
    bwd_perm = [(i + 1, i) for i in range(S - 1)]

    def per_device(params_L, active_L, kind_L, table_T, stage, x_mb, aux_all, lp):
        params_L = jax.tree.map(lambda a: a[0], params_L)
        active_L, kind_L, table_T, stage = active_L[0], kind_L[0], table_T[:, 0], stage[0]
        last = stage == S - 1
        L = layout.slots
        # Active slots are a prefix of the stage, and so are its KIND_NONE slots among them.
        n_active = jnp.sum(active_L.astype(jnp.int32))
        n_none = jnp.sum((active_L & (kind_L == KIND_NONE)).astype(jnp.int32))
        # Buffers inherit the microbatch's sharding over the other mesh axes (explicit axes must match in selects).
        zero_x = jnp.zeros_like(x_mb[0])
        buffer = lambda k: jnp.broadcast_to(zero_x[None], (k,) + mb_shape)  # noqa: E731

        def tick(carry, row):
            xs, gs, gacc, lpacc, loss, dxs = carry
            op, m, xslot, gslot, rx, rg = (row[i] for i in range(len(FIELDS)))
            m0 = jnp.maximum(m, 0)
            slot = jnp.maximum(xslot, 0)
            aux_m = _index(aux_all, m0)

            def idle():
                return zero_x, zero_x, xs, gacc, lpacc, loss, dxs

            def fwd():
                # Every slot's input is kept for the backward (row 0 is where the previous stage's activation
                # arrived). A stage without a backward writes into a slot that nobody reads.
                x = jnp.where(stage == 0, x_mb[m0], xs[slot, 0])
                y, new_xs = _stage_forward(layer_fn, params_L, n_active, x, aux_m, saved=xs, slot=slot)

                def loss_now():
                    # The last stage takes the loss and its cotangent in its forward tick (its backward tick is
                    # then the layers' vjps only); the cotangent waits in the slot's spare row L_max.
                    value, vjp = jax.vjp(lambda yy, q: loss_fn(q, yy, aux_m), y, lp)
                    dy, dlp = vjp(jnp.ones_like(value))
                    kept = jax.lax.dynamic_update_slice(new_xs, dy[None, None], (slot, L) + (0,) * dy.ndim)
                    return zero_x, kept, jax.tree.map(jnp.add, lpacc, dlp), loss + value.astype(jnp.float32)

                def send():
                    return y, new_xs, lpacc, loss

                y, new_xs, new_lpacc, new_loss = jax.lax.cond(last, loss_now, send)
                return y, zero_x, new_xs, gacc, new_lpacc, new_loss, dxs

            def bwd():
                dy = jnp.where(last, xs[slot, L], gs[jnp.maximum(gslot, 0)])
                new_gacc, dx = _stage_backward(layer_fn, params_L, kind_L, n_active, n_none, xs, slot, dy, aux_m,
                                               gacc)
                new_dxs = dxs
                if want_dx:
                    new_dxs = jax.lax.cond(stage == 0, lambda: dxs.at[m0].set(dx), lambda: dxs)
                return zero_x, dx, xs, new_gacc, lpacc, loss, new_dxs

            y, dx, xs, gacc, lpacc, loss, dxs = jax.lax.switch(op, (idle, fwd, bwd, idle))
            xs, gs = _receive(xs, gs, jax.lax.ppermute(y, axis, fwd_perm), jax.lax.ppermute(dx, axis, bwd_perm),
                              rx, rg)
            return (xs, gs, gacc, lpacc, loss, dxs), None

        init = (
            jnp.broadcast_to(zero_x[None, None], (sched.x_slots, L + 1) + mb_shape),  # slot inputs + cotangent row
            buffer(sched.g_slots),
            _zeros_like(params_L),
            _zeros_like(lp),
            jnp.float32(0.0),
            buffer(M) if want_dx else jnp.zeros((), dtype),
        )
        (_, _, gacc, lpacc, loss, dxs), _ = jax.lax.scan(tick, init, table_T)
        # Only the last stage has a loss and loss-parameter gradients, only stage 0 an input gradient.
        total = lambda t: jax.tree.map(lambda a: jax.lax.psum(a, axis), t)  # noqa: E731
        return jax.tree.map(lambda a: a[None], gacc), total(lpacc), total(loss), total(dxs)

    return per_device


def _receive(xs, gs, y_in, g_in, rx, rg):
    """Store what arrived at the end of a tick: the previous stage's activation in row 0 of x slot ``rx``, the next
    stage's cotangent in g slot ``rg`` (-1: nothing arrived)."""
    xs = jax.lax.cond(
        rx >= 0,
        lambda: jax.lax.dynamic_update_slice(xs, y_in[None, None], (jnp.maximum(rx, 0), 0) + (0,) * y_in.ndim),
        lambda: xs,
    )
    gs = jax.lax.cond(rg >= 0, lambda: gs.at[jnp.maximum(rg, 0)].set(g_in), lambda: gs)
    return xs, gs


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
