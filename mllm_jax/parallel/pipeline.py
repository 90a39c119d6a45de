"""Pipeline runtime: one jit, layers stacked and sharded over the `pipeline` mesh axis, the schedule as data.

The schedule is a numpy table [tick, stage] of ops with the microbatch and the buffer slots each op reads and each
arriving message is written to (``parallel.schedule``: 1F1B, ZB-H1, 1F1B-FB, 1F1B-sliced, GPipe, and with several
chunks of layers per device ZB-V and interleaved; 1F1B-sliced runs an op's layers over several ticks, a slice each). The runtime (``pipeline_value_and_grad``) scans over the table's rows inside
``jax.shard_map`` over `pipeline`: each device reads its column, runs its op on the chunk the table names (every
op is a loop over the chunk's layers whose trip count is data: zero for the ops the table does not name, so the
tick runs one op's layers; no conditional carries the activation pool or the gradient accumulator, which XLA then
updates in place), and exchanges activations (forward) and input cotangents
(backward) with its neighbours by ``ppermute`` every tick, after the tick's op or, with ``overlap``, beside the next
tick's.

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
[layers, ...] layout and are laid out to / from [stages, slots, ...] inside the jit. Stored over the pipeline axis
in contiguous blocks, a uniform split's blocks stay where they are; a uniform split into chunks moves each block to
its chunks' devices in V ppermute rounds (``block_rounds``), an uneven split the rows each device runs, by shift
(``split_moves``); stored otherwise, each device takes its slots from its copy. A stage walks only its
own slots: its loops' trip count is the stage's active layer count (data, not a shape), so padding costs no compute,
only the padded slots' memory. Memory: one pool of activation slots per device (saved inputs, and for ZB-H1 the kept
cotangents of a deferred W) sized by the schedule; the device's share of the microbatch inputs and input gradients
(``parallel.conveyor``: stored over `pipeline`, carried to and from device 0 on a ring, one message per tick beside
the op); a weight-gradient accumulator with rows for the slots that have a
weight gradient only (``StageLayout.grad_rows``), none when no layer trains, none for frozen leaves; with
``gather_params`` the stage's weights as the layers use them (e.g. FSDP-gathered in the compute dtype), made once per
step before the tick loop instead of per layer and op. With ``prepare`` (``Prepare``) a device also makes some of its
stored inputs in its idle ticks (frozen encoders' forwards in the warm-up bubbles, ``parallel.bubble_encode``), each
tick starting with a loop over the slots the plan names there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from mllm_jax.parallel.bubble_encode import EncodePlan, check_plan
from mllm_jax.parallel.conveyor import Conveyor, pad_microbatches, plan_conveyor, slots_per_device
from mllm_jax.parallel.schedule import (FIELDS, OP_B, OP_BW, OP_F, OP_FB, OP_IDLE, OP_SKIP, OP_W, SCHEDULES,
                                        TO_LEFT, TO_RIGHT, TO_SELF, VIRTUAL_SCHEDULES, Schedule, Slicing,
                                        backward_units, build_schedule, stage_op_order, virtual_placement,
                                        virtual_stages_of)

# Older names of the ops (the fused backward was the only one).
OP_FWD, OP_BWD, OP_BWD_SKIP = OP_F, OP_BW, OP_SKIP
__all__ = ["FIELDS", "OP_B", "OP_BW", "OP_F", "OP_FB", "OP_IDLE", "OP_SKIP", "OP_W", "SCHEDULES", "Schedule",
           "TO_LEFT", "TO_RIGHT", "TO_SELF",
           "build_schedule",
           "layout_schedule", "make_layout", "pipeline_value_and_grad", "sequential_value_and_grad", "stage_op_order"]

# The name scope of the conveyor's ppermute (``parallel.conveyor``) in the compiled program's op names.
CONVEYOR_SCOPE = "pipeline_conveyor"
# Slot kinds: which backward a layer slot runs.
KIND_NONE, KIND_DX, KIND_DW, KIND_DX_DW = 0, 1, 2, 3
# Per-tick trace columns (``pipeline_value_and_grad(trace=True)``): what a stage ran in that tick, counted in its
# loops: layer forwards, layer forwards recomputed inside vjps (remat), layer input gradients, layer weight gradients,
# microbatch inputs prepared in the tick (``Prepare``: encoders in the bubbles).
TRACE_FIELDS = ("forward_layers", "recomputes", "input_grads", "weight_grads", "encodes")


@dataclass(frozen=True)
class StageLayout:
    """Canonical layers -> [stages, slots]: ``index`` [S, L_max] (layer per slot, 0 where padded), ``active``
    [S, L_max], ``kind`` [S, L_max] (KIND_*), ``backward_stages`` [S]. The stages are the model's (virtual) stages
    in order; ``schedule`` says how they sit on the devices (``schedule.virtual_placement``: one per device, or V
    chunks per device for "interleaved" / "zb_v"), and ``device_view`` lays a per-stage array out per device."""

    stage_layers: tuple
    index: np.ndarray
    active: np.ndarray
    kind: np.ndarray
    backward_stages: np.ndarray
    schedule: str = "1f1b"
    virtual: int = 1

    @property
    def stages(self) -> int:
        """The model's stages (virtual stages: devices x chunks per device)."""
        return len(self.stage_layers)

    @property
    def devices(self) -> int:
        return self.stages // self.virtual

    def device_view(self, a: np.ndarray) -> np.ndarray:
        """[stages, L_max, ...] -> [devices, chunks x L_max, ...]: chunk c of device d is the stage placed there."""
        place = virtual_placement(self.schedule, self.devices, self.virtual)
        order = np.zeros((self.devices, self.virtual), np.int64)
        order[place[:, 0], place[:, 1]] = np.arange(self.stages)
        a = np.asarray(a)[order]  # [devices, chunks, L_max, ...]
        return a.reshape((self.devices, self.virtual * a.shape[2]) + a.shape[3:])

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
        return max(1, int(self.device_view(self.grad_slots).sum(axis=1).max()))


def layout_schedule(layout: StageLayout, microbatches: int, kind: str | None = None,
                    max_in_flight: int | None = None, overlap: bool = False, slicing: Slicing | None = None) -> Schedule:
    """The table the runtime executes for ``layout`` (the planner prices the same one: schedule.simulate);
    ``kind`` defaults to the layout's schedule; ``max_in_flight``: zb_v's admitted microbatches; ``slicing``: how
    "1f1b_sliced" cuts the ops into ticks (None: ``layout_slicing``), checked against the layout's stages."""
    kind = layout.schedule if kind is None else kind
    if virtual_stages_of(kind, layout.virtual if kind in VIRTUAL_SCHEDULES else None) != layout.virtual:
        raise ValueError(f"schedule {kind!r} does not run the layout's {layout.virtual} chunks per device")
    if kind == "1f1b_sliced":
        slicing = layout_slicing(layout) if slicing is None else slicing
        if slicing.stage_layers != tuple(layout.stage_layers):
            raise ValueError(f"the slicing is for stages of {list(slicing.stage_layers)} layers; the pipeline's "
                             f"stages have {list(layout.stage_layers)}")
    elif slicing is not None:
        raise ValueError(f"a slicing cuts the ops of schedule '1f1b_sliced' into ticks; got one with {kind!r}")
    return build_schedule(layout.devices, microbatches, backward_stages=layout.backward_stages,
                          weight_stages=layout.weight_stages, kind=kind, virtual_stages=layout.virtual,
                          max_in_flight=max_in_flight, overlap=overlap, slicing=slicing)


def layout_slicing(layout: StageLayout, budget: int = 2) -> Slicing:
    """"1f1b_sliced"'s default cut of ``layout``: each layer's forward 1 unit, its backward by its kind
    (``schedule.backward_units``: remat + dX + dW), the loss head not counted; ticks of ``budget`` units (the planner
    passes its own, from its costs: ``PipelinePlan.runtime.slicing``)."""
    fw, bw = [], []
    for s, n in enumerate(layout.stage_layers):
        kinds = layout.kind[s, :n]
        fw.append((1,) * int(n))
        bw.append(tuple(backward_units(k in (KIND_DX, KIND_DX_DW), k >= KIND_DW) for k in kinds))
    return Slicing(tuple(fw), tuple(bw), budget)


def make_layout(stage_layers, trainable_layers=None, *, input_requires_grad=False, loss_params_trainable=True,
                schedule: str = "1f1b", virtual_stages: int | None = None):
    """``stage_layers``: layers per (virtual) stage (uneven allowed, each >= 1): devices x chunks per device of
    ``schedule`` entries. ``trainable_layers``: bool per layer (None = all). ``input_requires_grad``: the pipeline
    input depends on trainable parameters (projectors, embedding), so every layer must pass dX back."""
    V = virtual_stages_of(schedule, virtual_stages)
    if len(stage_layers) % V:
        raise ValueError(f"schedule {schedule!r} runs {V} chunks per device: stage_layers needs a multiple of {V} "
                         f"entries; got {len(stage_layers)}")
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
    return StageLayout(tuple(counts), index, active, kind, backward, schedule, V)


def _is_uniform(layout: StageLayout) -> bool:
    """One stage per device, all of one length: each device's block of the stored layers is its stage."""
    return layout.virtual == 1 and bool(layout.active.all())


def _is_uniform_virtual(layout: StageLayout) -> bool:
    """Several chunks per device, every virtual stage of one length: the stored layers' block on device d (layers
    sharded over the pipeline axis in contiguous blocks) is virtual stages d V .. d V + V - 1, each a whole chunk."""
    return layout.virtual > 1 and bool(layout.active.all())


@dataclass(frozen=True)
class BlockRounds:
    """How the chunks of a uniform virtual-stage split move between their storage blocks and their devices in V
    rounds of ``ppermute``: each round every device sends one of its V stored blocks (``send[r, d]``, the block's
    index in d's storage) and receives one chunk (``recv[r, d]``, the chunk it becomes), along ``pairs[r]``."""

    send: np.ndarray  # [V, S]
    recv: np.ndarray  # [V, S]
    pairs: tuple  # per round, the (source, destination) pairs


def block_rounds(layout: StageLayout) -> BlockRounds:
    """The V rounds: the moves (block j of device s = virtual stage s V + j -> its placement) form a V-regular
    bipartite multigraph between devices, which splits into V perfect matchings (Konig), found one per round by
    augmenting paths; each matching is a permutation, one ppermute."""
    S, V = layout.devices, layout.virtual
    place = virtual_placement(layout.schedule, S, V)
    edges = {(s, j): (int(place[s * V + j, 0]), int(place[s * V + j, 1])) for s in range(S) for j in range(V)}
    left = dict(edges)
    send = np.zeros((V, S), np.int64)
    recv = np.zeros((V, S), np.int64)
    pairs = []
    for r in range(V):
        match_of = {}  # destination device -> (source device, block)

        def augment(s, seen):
            for (s2, j), (d, _) in left.items():
                if s2 != s or d in seen:
                    continue
                seen.add(d)
                if d not in match_of or augment(match_of[d][0], seen):
                    match_of[d] = (s, j)
                    return True
            return False

        for src in range(S):
            if not augment(src, set()):
                raise AssertionError(f"no perfect matching in round {r}")  # unreachable: the graph is regular
        round_pairs = []
        for d, (src, j) in sorted(match_of.items()):
            send[r, src], recv[r, d] = j, left.pop((src, j))[1]
            round_pairs.append((src, d))
        pairs.append(tuple(sorted(round_pairs)))
    return BlockRounds(send, recv, tuple(pairs))


@dataclass(frozen=True)
class RowMoves:
    """How stored layer rows reach the device slots that run them, in rounds of one ``ppermute`` each (a round
    whose pairs are all (d, d) stays on the device): in round r device d sends rows ``src[r][d]`` of its storage
    block (index ``block_rows``: none) to its partner, which writes them to its slots ``dst[r][partner]`` (index
    ``slots``: none). The gradients go back the same way, each pair turned round."""

    src: tuple  # per round, int [S, P_r]: storage rows sent (block_rows = padding)
    dst: tuple  # per round, int [S, P_r]: slots written on the receiving device (slots = padding)
    pairs: tuple  # per round, the (source, destination) pairs
    block_rows: int  # rows of a device's storage block
    slots: int  # the device's slots (chunks x L_max)


def block_moves(layout: StageLayout) -> RowMoves:
    """``block_rounds`` as row moves: each round moves one whole block of L rows."""
    rounds = block_rounds(layout)
    L, V = layout.slots, layout.virtual
    rows = np.arange(L)
    src = tuple(rounds.send[r][:, None] * L + rows for r in range(V))
    dst = tuple(np.zeros_like(x) for x in src)
    for r in range(V):
        for s, d in rounds.pairs[r]:
            dst[r][d] = rounds.recv[r][d] * L + rows
    return RowMoves(src, dst, rounds.pairs, V * L, V * L)


def split_moves(layout: StageLayout, block_rows: int) -> RowMoves:
    """Row moves from storage blocks of ``block_rows`` contiguous layers per device (device d: layers d B ..
    d B + B - 1) to any split's device slots (``layout.device_view(layout.index)``; an uneven one-chunk split, or an
    uneven virtual one). One round per shift k (device d sends to d + k mod S) that has rows to move, padded to the
    round's largest piece: a contiguous split moves rows by a few shifts only, and nothing crosses the devices that
    does not go where it is used."""
    S, B = layout.devices, int(block_rows)
    index = layout.device_view(layout.index)
    active = layout.device_view(layout.active)
    slots = index.shape[1]
    if int(active.sum()) != S * B:
        raise ValueError(f"storage blocks of {B} layers on {S} devices do not hold the split's {int(active.sum())}")
    by_shift = {}  # k -> per source device [(storage row, destination slot)]
    for e in range(S):
        for j in np.flatnonzero(active[e]):
            layer = int(index[e, j])
            d = layer // B
            by_shift.setdefault((e - d) % S, [[] for _ in range(S)])[d].append((layer - d * B, int(j)))
    src, dst, pairs = [], [], []
    for k in sorted(by_shift, key=lambda k: (k != 0, k)):  # the local round first
        per_device = by_shift[k]
        width = max(len(x) for x in per_device)
        s_r = np.full((S, width), B, np.int64)
        d_r = np.full((S, width), slots, np.int64)
        for d, rows in enumerate(per_device):
            e = (d + k) % S
            for i, (row, slot) in enumerate(rows):
                s_r[d, i], d_r[e, i] = row, slot
        src.append(s_r)
        dst.append(d_r)
        pairs.append(tuple((d, (d + k) % S) for d in range(S) if per_device[d]))
    return RowMoves(tuple(src), tuple(dst), tuple(pairs), B, slots)


def _move_rows(tree, moves: RowMoves, me, axis: str, *, back: bool = False):
    """Inside the shard_map: this device's storage block [block_rows, ...] -> its slots [slots, ...] (rows no
    move writes are zeros: padded slots, never run); ``back``: the slots' rows (gradients) -> the storage block."""
    n_out = moves.block_rows if back else moves.slots

    def one(a):
        pad = jnp.zeros_like(a[:1])  # zeros keep the row's sharding over the other mesh axes
        a = jnp.concatenate([a, pad], axis=0)  # the last row: padding's source
        out = jnp.broadcast_to(pad, (n_out + 1,) + a.shape[1:])  # the last row: padding's sink
        for src, dst, pairs in zip(moves.src, moves.dst, moves.pairs):
            take, put = (dst, src) if back else (src, dst)
            piece = jnp.take(a, jnp.asarray(take)[me], axis=0)
            if any(s != d for s, d in pairs):
                piece = jax.lax.ppermute(piece, axis, [(d, s) for s, d in pairs] if back else list(pairs))
            out = out.at[jnp.asarray(put)[me]].set(piece)
        return out[:n_out]

    return jax.tree.map(one, tree)


def _storage_moves(layout: StageLayout, stacked_params, mesh, axis: str, n_layers: int) -> RowMoves | None:
    """How the layers get from their storage to the device slots, when they are stored in contiguous blocks over
    ``axis`` alone (the LLM's ``layers`` rule where the pipeline divides the layer count): None for a uniform
    one-chunk split (each block is its stage: ``to_stages`` reshapes) or other storage (``to_stages`` gathers);
    a uniform split into chunks: V rounds of whole blocks (``block_moves``); an uneven split: the rows each device
    needs, by shift (``split_moves``). Every device gathering every layer is what the moves replace."""
    S = layout.devices
    if mesh is None or _is_uniform(layout) or n_layers % S or not all(
            _spec_of(a)[0] == axis for a in jax.tree.leaves(stacked_params)):
        return None
    return block_moves(layout) if _is_uniform_virtual(layout) else split_moves(layout, n_layers // S)


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
    index = layout.device_view(layout.index)  # [devices, chunks x L_max]
    S, L = index.shape

    def one(a):
        if mesh is not None and _sharded_over(a, 0, axis):
            spec = _spec_of(a)
            if _is_uniform(layout) and spec[0] == axis:  # blocks of `axis` alone: each device's block is its stage
                return jnp.reshape(a, (S, L) + a.shape[1:], out_sharding=NamedSharding(mesh, P(axis, None, *spec[1:])))
            a = _reshard_dim(a, mesh, None, axis)
        idx = jnp.asarray(index.reshape(-1))
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


def _stage_forward(layer_fn, params_L, n_active, x, aux_m, saved=None, slot=0, cnt=None, off=0, lo=0):
    """Run slots ``lo`` .. ``n_active`` - 1 (traced bounds: the loop's trip count is data, so the padded slots of a
    shorter stage are never visited; ``lo`` > 0: a slice that goes on from an earlier one's output ``x``). ``saved`` [act_slots, L_max, ...]: when given, slot i's input is written to
    ``saved[slot, i]`` in place (the backward's per-layer rematerialisation starts from these). ``cnt``: the trace
    counter (int32[len(TRACE_FIELDS)]) or None. ``off``: the chunk's first slot among the device's (its layers are
    params_L[off + i]). Returns (y, saved, cnt)."""

    def body(i, carry):
        h, buf, c = carry
        if buf is not None:
            buf = jax.lax.dynamic_update_slice(buf, h[None, None], (slot, i) + (0,) * h.ndim)
        if c is not None:
            c = c.at[0].add(1)
        return layer_fn(_index(params_L, off + i), h, aux_m), buf, c

    return jax.lax.fori_loop(lo, n_active, body, (x, saved, cnt))


def _row(buf, slot, i):
    """buf[slot, i] with traced indices."""
    return jax.lax.dynamic_slice(buf, (slot, i) + (0,) * (buf.ndim - 2), (1, 1) + buf.shape[2:])[0, 0]


def _zero_grads(p, split=None) -> list:
    """Zeros shaped and laid out like one layer's trainable leaves (what a branch without a weight gradient returns:
    branch outputs must match in sharding too)."""
    return [jnp.zeros_like(a) for a in (split or ParamSplit(p)).split(p)[0]]


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
                    split=None, rows=None, off=0):
    """The fused backward (BW): reverse walk over the active slots with the per-slot vjp branch (each recomputes its
    layer's forward from the input the forward saved in ``saved[slot, i]``: remat per layer, no second pass over the
    stage), adding each slot's trainable-leaf gradients into ``gacc`` (list of [L_max, ...]; None: no layer of the
    pipeline trains, so no branch takes dW); returns (gacc, dx, cnt). Slots below ``n_none`` (KIND_NONE: frozen with
    nothing trainable upstream, always a prefix) and padded slots are not visited."""

    def body(j, carry):
        g, acc, c = carry
        i = n_active - 1 - j
        p, k = _index(params_L, off + i), kind_L[off + i]
        x = _row(saved, slot, i)
        zeros = None if acc is None else _zero_grads(p, split)

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
            acc = _add_grad(acc, off + i if rows is None else rows[off + i], dq)
        if c is not None:
            c = c.at[1:4].add(jnp.stack([k > KIND_NONE, (k == KIND_DX) | (k == KIND_DX_DW), k >= KIND_DW]).astype(
                c.dtype))
        return dx, acc, c

    dx, gacc, cnt = jax.lax.fori_loop(0, n_active - n_none, body, (dy, gacc, cnt))
    return gacc, dx, cnt


def _stage_input_grad(layer_fn, params_L, kind_L, n_active, n_none, acts, slot, w_slot, dy, aux_m, cnt=None, off=0):
    """B: the input gradient only. Reverse walk as in the fused backward, but each slot takes dX only (its vjp with
    respect to the input: no dW is computed), and a slot with a weight gradient keeps the cotangent of its output in
    ``acts[w_slot, i]`` for the W op. Returns (acts, dx, cnt)."""

    def body(j, carry):
        g, buf, c = carry
        i = n_active - 1 - j
        p, k = _index(params_L, off + i), kind_L[off + i]
        buf = _write_row(buf, g, (w_slot, i), k >= KIND_DW)  # kept where the slot has a weight gradient
        x = _row(buf, slot, i)
        has_dx = (k == KIND_DX) | (k == KIND_DX_DW)
        g = jax.lax.cond(has_dx, lambda: layer_grads(layer_fn, p, x, g, aux_m, dx=True, dw=False)[1], lambda: g)
        if c is not None:
            c = c.at[1:3].add(jnp.stack([has_dx, has_dx]).astype(c.dtype))
        return g, buf, c

    dx, acts, cnt = jax.lax.fori_loop(0, n_active - n_none, body, (dy, acts, cnt))
    return acts, dx, cnt


def _stage_weight_grad(layer_fn, params_L, kind_L, n_active, n_none, acts, slot, w_slot, aux_m, gacc, cnt=None,
                       split=None, rows=None, off=0):
    """W: the weight gradient only, of the slots that have one: each one's vjp with respect to its trainable leaves
    (no dX), from its saved input ``acts[slot, i]`` and the output cotangent B kept in ``acts[w_slot, i]``."""

    def body(i, carry):
        acc, c = carry
        has_dw = kind_L[off + i] >= KIND_DW
        p = _index(params_L, off + i)

        def dw():
            return layer_grads(layer_fn, p, _row(acts, slot, i), _row(acts, w_slot, i), aux_m, dx=False, dw=True,
                               split=split)[0]

        # The cond returns the layer's gradient (zeros without one), not the accumulator: as in the fused backward,
        # no conditional carries the accumulator.
        dq = jax.lax.cond(has_dw, dw, lambda: _zero_grads(p, split))
        acc = _add_grad(acc, off + i if rows is None else rows[off + i], dq)
        if c is not None:
            c = c.at[1:4].add(jnp.stack([has_dw, 0, has_dw]).astype(c.dtype))
        return acc, c

    return jax.lax.fori_loop(n_none, n_active, body, (gacc, cnt))


def _index(tree, i):
    return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, 0, keepdims=False), tree)


@dataclass(frozen=True)
class Prepare:
    """Inputs made inside the pipeline, in its idle ticks (``parallel.bubble_encode``: frozen encoders' forwards in
    the warm-up bubbles). ``fn(params, inputs_j, x_j) -> (x_j, out_j)`` makes one microbatch's input from its
    stored input ``x_j`` ([mb, ...], e.g. the token embeddings) and its ``inputs_j`` (e.g. pixels and feature
    indices); it is a forward only (no gradient flows into ``params`` or ``inputs``), and ``out_j`` (e.g. the
    encoder's features) comes back per microbatch for the caller's own backward. ``params``: replicated over the
    pipeline axis. ``inputs``: a pytree of [devices x K, ...] leaves in the conveyor's rows (microbatch m at row
    m; rows past M unused). ``plan``: which device prepares which of its slots in which tick (checked against the
    table that runs)."""

    fn: Callable
    params: object
    inputs: object
    plan: EncodePlan


@dataclass(frozen=True)
class RuntimeTables:
    """What the runtime executes for a pipeline: the stage layout, the schedule's table and the conveyor's moves."""

    layout: StageLayout
    schedule: Schedule
    conveyor: Conveyor


def runtime_tables(stage_layers, microbatches: int, *, trainable_layers=None, input_requires_grad=False,
                   loss_params_trainable=True, schedule: str = "1f1b", virtual_stages: int | None = None,
                   max_in_flight: int | None = None, overlap: bool = False, slicing: Slicing | None = None,
                   layer_trains: bool = True) -> RuntimeTables:
    """The layout, table and conveyor ``pipeline_value_and_grad`` runs with these arguments (``layer_trains``
    False: no leaf of a layer trains, so every layer is frozen whatever ``trainable_layers`` says); a caller plans
    on them (e.g. ``bubble_encode.plan_encodes``) before calling it."""
    V = virtual_stages_of(schedule, virtual_stages)
    n_layers = sum(int(c) for c in stage_layers)
    if not layer_trains:
        trainable_layers = np.zeros(n_layers, bool)
    layout = make_layout(stage_layers, trainable_layers, input_requires_grad=input_requires_grad,
                         loss_params_trainable=loss_params_trainable, schedule=schedule, virtual_stages=V)
    if max_in_flight is not None and schedule != "zb_v":
        raise ValueError(f"max_in_flight paces the zb_v schedule only; got {max_in_flight} with {schedule!r}")
    sched = layout_schedule(layout, microbatches, schedule, max_in_flight, overlap, slicing)
    return RuntimeTables(layout, sched, plan_conveyor(sched, microbatches, input_grads=bool(input_requires_grad)))


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
    virtual_stages: int | None = None,
    max_in_flight: int | None = None,
    overlap: bool = False,
    microbatches: int | None = None,
    slicing: Slicing | None = None,
    prepare: Prepare | None = None,
):
    """Loss and gradients of a layer stack run as a pipeline. Call inside jit (or let it jit itself by wrapping).

    layer_fn(layer_params, x, aux_m) -> x: one layer; x [mb, ...] keeps its shape and dtype.
    stacked_params: pytree with leading [layers] axis (canonical layout). x_microbatches [M, mb, ...].
    loss_fn(loss_params, y, aux_m) -> scalar loss *sum* of one microbatch (the caller divides by the global count).
    aux: pytree with leading [M] (labels, token metadata), given to layer_fn and loss_fn per microbatch.
    stage_layers: layers per stage: mesh.shape[axis] entries, or devices x chunks for "interleaved" (V =
    ``virtual_stages`` chunks per device, default 2) and "zb_v" (2), in the model's order. trainable_layers: bool
    per layer.
    param_trainable: bools with the structure of one layer's parameters (None: every leaf): which leaves of a
    trainable layer train (LoRA: the adapters); the others get no dW computed and a zero gradient.
    schedule: one of ``schedule.SCHEDULES`` ("1f1b", "zb_h1", "1f1b_fb", "1f1b_sliced", "gpipe", "interleaved",
    "zb_v");
    ``max_in_flight``: zb_v's microbatches admitted at once (None: min(stages, M), 1F1B's activation memory;
    with ``overlap`` min(2 stages - 1, M)).
    ``overlap``: each tick's ppermutes run during the next tick, beside its ops (``build_schedule(overlap=True)``).
    ``slicing``: how "1f1b_sliced" cuts each stage's ops into ticks (``schedule.Slicing``, e.g. the planner's
    ``PipelinePlan.runtime.slicing``; None: ``layout_slicing``).
    ``microbatches``: M, when ``x_microbatches`` already has the conveyor's rows (devices x
    ``conveyor.slots_per_device(M, devices)``, zeros past M, ideally stored over ``axis``: each device makes only its
    own); the input gradient then comes back with the same rows. None: M = x_microbatches.shape[0].
    gather_params(stage_params) -> stage_params: the stage's parameters ([slots, ...] leaves, as stored) as its
    layers use them, e.g. cast to the compute dtype and FSDP-gathered. Called once per step on each device, before
    the tick loop; every op of the step runs on its output, and the weight gradients, taken with respect to it, are
    cast and laid out back into the storage layout's accumulator as they are added (a reduce-scatter per layer and
    backward). None: the layers get the parameters as stored (``layer_fn`` gathers what it needs itself).
    ``prepare``: some microbatches' inputs made inside the pipeline, in idle ticks (``Prepare``; one-chunk
    schedules): ``x_microbatches`` holds what its ``fn`` starts from for those.

    Returns (loss_sum, (grads_stacked [layers, ...], grads_loss_params, dx_microbatches or None)); frozen layers
    get zero gradients (no buffer inside the pipeline when no layer trains); dx_microbatches is computed only with
    ``input_requires_grad``. With ``prepare`` the next output is what its ``fn`` returned per microbatch
    ([devices x K, ...] leaves, the conveyor's rows: microbatch m at row m, zeros where nothing was prepared).
    ``trace=True`` adds a last output: int32 [ticks, stages, len(TRACE_FIELDS)], the layer forwards /
    input-gradient vjps / weight-gradient vjps / prepared inputs each stage ran in each tick (counted inside the
    loops).
    """
    S = mesh.shape[axis]
    V = virtual_stages_of(schedule, virtual_stages)
    if len(stage_layers) != S * V:
        raise ValueError(f"stage_layers has {len(stage_layers)} stages but mesh axis {axis!r} has {S} devices"
                         + (f" x {V} chunks per device under {schedule!r}" if V > 1 else ""))
    n_layers = jax.tree.leaves(stacked_params)[0].shape[0]
    if sum(stage_layers) != n_layers:
        raise ValueError(f"stage_layers {tuple(stage_layers)} sum to {sum(stage_layers)}; params have {n_layers}")
    M = x_microbatches.shape[0] if microbatches is None else int(microbatches)
    x_rows = S * slots_per_device(M, S) if microbatches is not None else M
    if x_microbatches.shape[0] != x_rows:
        raise ValueError(f"x_microbatches has {x_microbatches.shape[0]} rows; with microbatches={M} on {S} devices "
                         f"it must have the conveyor's {x_rows} (devices x slots per device)")
    want_dx = bool(input_requires_grad)
    # One layer's structure only (a[0] of a stack sharded over `pipeline` cannot be sliced on an Explicit mesh).
    one_layer = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), stacked_params)
    split = ParamSplit(one_layer, param_trainable)
    tables = runtime_tables(stage_layers, M, trainable_layers=trainable_layers, input_requires_grad=want_dx,
                            loss_params_trainable=loss_params_trainable, schedule=schedule, virtual_stages=V,
                            max_in_flight=max_in_flight, overlap=overlap, slicing=slicing,
                            layer_trains=any(split.mask))
    layout, sched, conveyor = tables.layout, tables.schedule, tables.conveyor
    if prepare is not None:
        check_plan(prepare.plan, sched, conveyor, M)
        _check_prepare_rows(prepare.inputs, conveyor)
    moves = _storage_moves(layout, stacked_params, mesh, axis, n_layers)
    per_device = _stage_program(_keep_layout(layer_fn), loss_fn, layout, sched, x_microbatches, axis, want_dx, trace,
                                split, gather_params, moves, conveyor=conveyor,
                                prepare_fn=None if prepare is None else prepare.fn)
    stage_spec = P(axis)
    fn = jax.shard_map(
        per_device,
        mesh=mesh,
        in_specs=(stage_spec, stage_spec, stage_spec, P(None, axis), P(), stage_spec, stage_spec, P(), P(),
                  P(None, axis), P(), stage_spec),
        out_specs=(stage_spec, P(), P(), stage_spec if want_dx else P(), P(None, axis), stage_spec),
        axis_names=frozenset({axis}),
        check_vma=False,
    )
    lead = lambda a: _reshard_dim(a, mesh, 0, axis)  # noqa: E731
    # In storage blocks (one per device, moved to its slots inside), or laid out per device here.
    storage = make_layout((moves.block_rows,) * S) if moves is not None else None
    replicated = lambda t: jax.tree.map(lambda a: _reshard_dim(a, mesh, None, axis), t)  # noqa: E731
    encode_T = np.zeros((sched.table.shape[0], S, 2), np.int32) if prepare is None else prepare.plan.slots
    gstaged, glp, loss, dx, counts, made = fn(
        jax.tree.map(lead, to_stages(stacked_params, storage or layout, mesh, axis)),
        lead(jnp.asarray(layout.device_view(layout.active))),
        lead(jnp.asarray(layout.device_view(layout.kind))),
        _reshard_dim(jnp.asarray(sched.table), mesh, 1, axis),  # [T, S, F]: each device reads its column
        _reshard_dim(jnp.asarray(conveyor.sends), mesh, None, axis),  # [T, 2]: the same for every device
        lead(jnp.arange(S, dtype=jnp.int32)),
        lead(pad_microbatches(x_microbatches, conveyor, jnp)),  # each device its slots of the inputs
        replicated({} if aux is None else aux),
        replicated(loss_params),
        _reshard_dim(jnp.asarray(encode_T), mesh, 1, axis),  # [T, S, 2]: each device its encodes
        replicated({} if prepare is None else prepare.params),
        jax.tree.map(lead, {} if prepare is None else prepare.inputs),  # each device its slots' inputs
    )
    if want_dx:  # [devices, slots, ...] -> each microbatch's input gradient [M, ...], stored over `axis`
        spec = _spec_of(dx)
        dx = jnp.reshape(dx, (-1,) + dx.shape[2:], out_sharding=NamedSharding(mesh, P(axis, *spec[2:])))
        if dx.shape[0] != x_rows:  # slots past M: a slice of a dimension sharded over `axis` must be even
            dx = _reshard_dim(dx, mesh, None, axis)[:x_rows]
    # No layer trains: no accumulator was carried; zeros here cost nothing where the caller drops them.
    zeros = jax.tree.leaves(jax.tree.map(jnp.zeros_like, stacked_params))
    if not layout.trains:
        trained = iter([])
    elif moves is not None:  # back in storage blocks: the layers in order, sharded over `axis` as stored
        trained = iter(jax.tree.leaves(from_stages(gstaged, storage, mesh, axis)))
    else:
        trained = iter(_grads_to_layers(gstaged, layout, mesh, axis))
    grads = jax.tree.unflatten(split.treedef, [next(trained) if m and layout.trains else z
                                                for z, m in zip(zeros, split.mask)])
    out = (loss, (grads, glp, dx if want_dx else None))
    if prepare is not None:  # [devices, K, ...] -> the conveyor's rows [devices x K, ...]
        out += (jax.tree.map(lambda a: jnp.reshape(a, (-1,) + a.shape[2:], out_sharding=NamedSharding(
            mesh, P(axis, *_spec_of(a)[2:]))), made),)
    return out + (counts,) if trace else out


def _check_prepare_rows(inputs, conveyor: Conveyor) -> None:
    rows = conveyor.devices * conveyor.per_device
    for a in jax.tree.leaves(inputs):
        if a.shape[0] != rows:
            raise ValueError(f"Prepare.inputs leaves need the conveyor's {rows} rows ({conveyor.devices} devices x "
                             f"{conveyor.per_device} slots); got a leaf of shape {tuple(a.shape)}")


def _grads_to_layers(gstaged, layout: StageLayout, mesh, axis) -> list:
    """[devices, grad_rows, ...] accumulators -> [layers, ...] per leaf: the rows of the slots with a weight gradient
    in layer order, zeros for the layers without one."""
    if layout.virtual > 1:
        return _device_rows_to_layers(gstaged, layout, mesh, axis)
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
    return [_rows_or_zero(_replicated(g, mesh, axis), where) for g in got]


def _device_rows_to_layers(gstaged, layout: StageLayout, mesh, axis) -> list:
    """Chunks per device: device d's accumulator rows are its slots with a weight gradient in (chunk, slot) order;
    each layer takes its row (replicated over ``axis`` first), or a zero row."""
    G = layout.grad_rows
    grad_dev, index_dev = layout.device_view(layout.grad_slots), layout.device_view(layout.index)
    src = np.full(int(layout.active.sum()), layout.devices * G)  # the zero row
    for d in range(layout.devices):
        for r, j in enumerate(np.flatnonzero(grad_dev[d])):
            src[index_dev[d, j]] = d * G + r
    return [_rows_or_zero(_replicated(g, mesh, axis).reshape((-1,) + g.shape[2:]), src)
            for g in jax.tree.leaves(gstaged)]


def _replicated(a, mesh, axis):
    return _reshard_dim(a, mesh, None, axis) if mesh is not None else a


def _rows_or_zero(g, idx):
    """g[idx] along the first axis, where an index len(g) picks a row of zeros."""
    return jnp.take(jnp.concatenate([g, jnp.zeros_like(g[:1])], axis=0), jnp.asarray(idx), axis=0)


def _perm(sched: Schedule, field: str, direction: int) -> list:
    """The (source, destination) pairs of the ppermute carrying ``field``'s messages in ``direction``: only the
    pairs some tick of the table uses (1F1B: d -> d + 1 without the wrap; interleaved: the ring)."""
    S = sched.stages
    step = 1 if direction == TO_RIGHT else -1
    senders = np.flatnonzero((sched.column(field) == direction).any(axis=0))
    return [(int(d), int((d + step) % S)) for d in senders]


def _stage_program(layer_fn, loss_fn, layout: StageLayout, sched: Schedule, x_microbatches, axis: str,
                   want_dx: bool, trace: bool = False, split: ParamSplit | None = None, gather_params=None,
                   moves: RowMoves | None = None, *, conveyor: Conveyor, prepare_fn=None):
    """The per-device body of the pipeline's shard_map: one device scanning its column of the schedule table, each
    tick its op (idle / F / B / W / BW / F+BW / skip: the ops' layer loops in turn, each with trip count zero
    unless the table names it) on the chunk the table names, then the
    ppermutes to its neighbours. Returns (its slots' parameter gradients, loss-parameter gradients and loss summed
    over devices, its slots of the input gradients (``conveyor``), its per-tick trace, what ``prepare_fn`` made for
    its slots (``Prepare``))."""
    S, V, K = layout.devices, layout.virtual, layout.stages
    mb_shape = x_microbatches.shape[1:]
    perms = {(f, d): _perm(sched, f, d) for f in ("x_to", "g_to") for d in (TO_RIGHT, TO_LEFT)}
    ring_down = [(d, (d - 1) % S) for d in range(S)]  # the conveyor's moves: d -> d - 1
    n_in = conveyor.per_device  # input (and input-gradient) slots per device
    trains = layout.trains

    def per_device(params_L, active_L, kind_L, table_T, sends_T, stage, x_mb, aux_all, lp, encode_T, prep_params,
                   prep_inputs):
        stored_L = jax.tree.map(lambda a: a[0], params_L)
        if moves is not None:  # this device's storage block -> its slots
            stored_L = _move_rows(stored_L, moves, stage[0], axis)
        # The copy the ops use: as stored, or gathered once here for the whole step (``gather_params``).
        params_L = stored_L if gather_params is None else gather_params(stored_L)
        active_L, kind_L, table_T, stage = active_L[0], kind_L[0], table_T[:, 0], stage[0]
        L = layout.slots  # slots per chunk; the device's slots are [chunks x L]
        # Per chunk: active slots are a prefix, and so are its KIND_NONE slots among them.
        n_active_V = jnp.sum(active_L.reshape(V, L).astype(jnp.int32), axis=1)
        n_none_V = jnp.sum((active_L & (kind_L == KIND_NONE)).reshape(V, L).astype(jnp.int32), axis=1)
        # Slot -> its row of the gradient accumulator (the slots with a weight gradient, in order).
        rows_L = jnp.maximum(jnp.cumsum((active_L & (kind_L >= KIND_DW)).astype(jnp.int32)) - 1, 0)
        G = layout.grad_rows
        # Buffers inherit the microbatch's sharding over the other mesh axes (explicit axes must match in selects).
        zero_x = jnp.zeros_like(x_mb[0])
        buffer = lambda k: jnp.broadcast_to(zero_x[None], (k,) + mb_shape)  # noqa: E731

        # An op maps the device's state (acts, gacc, lpacc, loss, dxs, cnt) to (what it sends, the new state);
        # ``c`` is the chunk, ``k`` its virtual stage.
        def fwd(st, slot, m0, c, k, xin, run, f_lo, f_hi):
            acts, gacc, lpacc, loss, dxs, cnt = st
            aux_m = _index(aux_all, m0)
            # The layers [lo, hi) of the chunk: all of them, or a slice of "1f1b_sliced" (-1: all).
            n = n_active_V[c]
            lo, hi = jnp.where(f_lo >= 0, f_lo, 0), jnp.where(f_hi >= 0, f_hi, n)
            ends = hi >= n
            # Every slot's input is kept for the backward (row 0 is where the previous stage's activation arrived;
            # row lo where an earlier slice left its output). A stage without a backward writes into a slot that
            # nobody reads. Virtual stage 0 (device 0) reads the microbatch's input from the slot the conveyor
            # brought it to.
            x = jnp.where((k == 0) & (lo == 0), xin[m0 % n_in], _row(acts, slot, jnp.minimum(lo, L - 1)))
            y, new_acts, cnt = _stage_forward(layer_fn, params_L, jnp.where(run, hi, 0), x, aux_m,
                                              saved=acts, slot=slot, cnt=cnt, off=c * L, lo=jnp.where(run, lo, 0))
            # A slice that ends below the chunk's top leaves its output where the next slice starts.
            new_acts = _write_row(new_acts, y, (slot, jnp.minimum(hi, L - 1)), run & ~ends)

            def loss_now():
                # The last virtual stage takes the loss and its cotangent in its forward (its backward is then the
                # layers' vjps only); the cotangent goes to the device's own g pool (``recv_go_slot``).
                value, vjp = jax.vjp(lambda yy, q: loss_fn(q, yy, aux_m), y, lp)
                dy, dlp = vjp(jnp.ones_like(value))
                return zero_x, dy, jax.tree.map(jnp.add, lpacc, dlp), loss + value.astype(jnp.float32)

            def send():
                return y, zero_x, lpacc, loss

            y, dy, lpacc, loss = jax.lax.cond(run & ends & (k == K - 1), loss_now, send)
            return y, dy, (new_acts, gacc, lpacc, loss, dxs, cnt)

        def incoming(gs, gslot, dy_now):
            """The output cotangent of a backward: an arrived one (or the loss cotangent kept in the g pool), else
            (a paired op's backward of the microbatch its forward half just made) ``dy_now``."""
            return jnp.where(gslot >= 0, gs[jnp.maximum(gslot, 0)], dy_now)

        def input_grad(dxs, dx, m0, k, run):
            if not want_dx:
                return dxs
            return _store(dxs, dx, jnp.where(run & (k == 0), m0 % n_in, -1))

        def trips(run, c, b_lo=-1, b_hi=-1):
            """The backward's (top, bottom) slots of chunk c: from the last active slot down to the KIND_NONE prefix,
            or a slice of them (b_lo / b_hi, -1: all); (0, 0) for an op that does not run: its loop's trip count is
            then zero."""
            hi = jnp.where(b_hi >= 0, b_hi, n_active_V[c])
            lo = jnp.maximum(jnp.where(b_lo >= 0, b_lo, 0), n_none_V[c])
            return jnp.where(run, hi, 0), jnp.where(run, lo, 0)

        def bwd_fused(st, g, slot, m0, c, k, run, b_lo, b_hi):
            acts, gacc, lpacc, loss, dxs, cnt = st
            gacc, dx, cnt = _stage_backward(layer_fn, params_L, kind_L, *trips(run, c, b_lo, b_hi), acts, slot, g,
                                            _index(aux_all, m0), gacc, cnt, split, rows_L, off=c * L)
            # Only the backward's last slice (down to layer 0) has the chunk's input gradient.
            return dx, (acts, gacc, lpacc, loss, input_grad(dxs, dx, m0, k, run & (b_lo <= 0)), cnt)

        def bwd_input(st, g, slot, w_slot, m0, c, k, run):
            acts, gacc, lpacc, loss, dxs, cnt = st
            acts, dx, cnt = _stage_input_grad(layer_fn, params_L, kind_L, *trips(run, c), acts, slot,
                                              w_slot, g, _index(aux_all, m0), cnt, off=c * L)
            return dx, (acts, gacc, lpacc, loss, input_grad(dxs, dx, m0, k, run), cnt)

        def bwd_weight(st, slot, w_slot, m0, c, run):
            acts, gacc, lpacc, loss, dxs, cnt = st
            if not trains:
                return st
            gacc, cnt = _stage_weight_grad(layer_fn, params_L, kind_L, *trips(run, c), acts, slot,
                                           w_slot, _index(aux_all, m0), gacc, cnt, split, rows_L, off=c * L)
            return acts, gacc, lpacc, loss, dxs, cnt

        def hop(value, to, field, direction):
            """``value`` over the ppermute of ``field``'s messages in ``direction`` (zeros from a device whose
            op sent nothing that way: ``to`` is its message's direction)."""
            pairs = perms[(field, direction)]
            if not pairs:
                return zero_x
            return jax.lax.ppermute(jnp.where(to == direction, value, zero_x), axis, pairs)

        def travel(y, dx, x_to, g_to):
            """What arrives from the neighbours when each device sends its activation ``y`` (to ``x_to``) and its
            input cotangent ``dx`` (to ``g_to``): in the order of the receive columns recv_x / recv_xl / recv_g /
            recv_gr."""
            return (hop(y, x_to, "x_to", TO_RIGHT), hop(y, x_to, "x_to", TO_LEFT),
                    hop(dx, g_to, "g_to", TO_LEFT), hop(dx, g_to, "g_to", TO_RIGHT))

        def conveyor_message(xin, dxs, sends):
            """The slots that move down the ring in the tick whose ``conveyor.sends`` row is ``sends``. Made at the
            end of the tick before (the buffers are then what that tick starts with) and carried, so that the
            tick's ppermute has its operand before anything of the tick runs and XLA starts it before the ops."""
            out = [jnp.where(sends[0] >= 0, xin[jnp.maximum(sends[0], 0)], zero_x)]
            if want_dx:
                out.append(jnp.where(sends[1] >= 0, dxs[jnp.maximum(sends[1], 0)], zero_x))
            return jnp.stack(out)

        def conveyor_send(message):
            """What arrives from d + 1 this tick, to store after the ops."""
            with jax.named_scope(CONVEYOR_SCOPE):  # named so that a compiled program shows where it runs
                return jax.lax.ppermute(message, axis, ring_down)

        def prepare_slots(xin, made, lo, hi, cnt):
            """The device's input slots [lo, hi) made by ``prepare_fn`` (a loop whose trip count is zero in the ticks
            without encodes), in place; what it returns per slot kept in ``made``."""
            if prepare_fn is None:
                return xin, made, cnt

            def body(j, carry):
                xin, made = carry
                x_j, out_j = prepare_fn(prep_params, _index(prep_inputs, j), xin[j])
                xin = _write_row(xin, _as_row_of(x_j, xin), (j,), True)
                made = jax.tree.map(lambda b, v: _write_row(b, _as_row_of(v, b), (j,), True), made, out_j)
                return xin, made

            xin, made = jax.lax.fori_loop(lo, hi, body, (xin, made))
            if cnt is not None:
                cnt = cnt.at[TRACE_FIELDS.index("encodes")].add(hi - lo)
            return xin, made, cnt

        def tick(carry, rows):
            row, sends, sends_next, enc = rows
            acts, gs, gacc, lpacc, loss, dxs, xin, sent, message, made = carry
            f = dict(zip(FIELDS, (row[i] for i in range(len(FIELDS)))))
            moved = conveyor_send(message)
            # Encodes first: an idle device makes inputs of its own slots before they move (``bubble_encode``).
            xin, made, cnt0 = prepare_slots(xin, made, enc[0], enc[1],
                                            jnp.zeros((len(TRACE_FIELDS),), jnp.int32) if trace else None)
            if sched.overlap:
                # Last tick's messages travel now, beside this tick's ops (nothing here waits for them until the
                # stores at the end): the ppermutes are off the critical path, and arrive a tick later.
                arrived = travel(*sent)
            m0, m2 = jnp.maximum(f["mb"], 0), jnp.maximum(f["mb2"], 0)
            slot, w_slot, slot2 = (jnp.maximum(f[k], 0) for k in ("x_slot", "w_slot", "x2_slot"))
            c, k = jnp.maximum(f["chunk"], 0), f["virtual"]
            gslot = f["g_slot"]
            st = (acts, gacc, lpacc, loss, dxs, cnt0)

            # The ops run one after another, each a loop whose trip count is zero unless the table's op is that
            # one (a paired F + BW runs the forward's loop, then the backward's): no conditional carries the
            # activation pool or the gradient accumulator, so XLA updates them in place (a lax.switch over the ops
            # kept copies of the pool live around the forward's loop).
            op = f["op"]
            paired = op == OP_FB
            run_f = (op == OP_F) | paired
            run_bw = (op == OP_BW) | paired
            y, dy, st = fwd(st, slot, m0, c, k, xin, run_f, f["f_lo"], f["f_hi"])
            y, dy = jnp.where(run_f, y, zero_x), jnp.where(run_f, dy, zero_x)
            # The backward's arrived cotangent, or a paired op's: the loss cotangent its forward half just made.
            g_in = incoming(gs, gslot, jnp.where(paired, dy, zero_x))
            dx_bw, st = bwd_fused(st, g_in, jnp.where(paired, slot2, slot), jnp.where(paired, m2, m0), c, k, run_bw,
                                  f["b_lo"], f["b_hi"])
            dx_b, st = bwd_input(st, g_in, slot, w_slot, m0, c, k, op == OP_B)
            st = bwd_weight(st, slot, w_slot, m0, c, op == OP_W)
            dx = jnp.where(run_bw, dx_bw, jnp.where(op == OP_B, dx_b, zero_x))
            acts, gacc, lpacc, loss, dxs, cnt = st
            if not sched.overlap:  # this tick's messages travel now, after its ops
                arrived = travel(y, dx, f["x_to"], f["g_to"])
            # Own arrivals: the turn of a V (activation or cotangent handed to the device's next chunk), a backward
            # slice's cotangent for the next slice, and the loss cotangent of the last virtual stage's forward.
            acts = _store(acts, arrived[0], f["recv_x_slot"], row0=True)
            acts = _store(acts, arrived[1], f["recv_xl_slot"], row0=True)
            acts = _store(acts, y, f["recv_xo_slot"], row0=True)
            gs = _store(gs, arrived[2], f["recv_g_slot"])
            gs = _store(gs, arrived[3], f["recv_gr_slot"])
            gs = _store(gs, dx, f["recv_go_slot"])
            gs = _store(gs, dy, f["recv_gl_slot"])
            xin = _store(xin, moved[0], sends[0])
            if want_dx:
                dxs = _store(dxs, moved[1], sends[1])
            sent = (y, dx, f["x_to"], f["g_to"]) if sched.overlap else sent
            return (acts, gs, gacc, lpacc, loss, dxs, xin, sent, conveyor_message(xin, dxs, sends_next), made), cnt

        dxs0 = jnp.zeros_like(x_mb) if want_dx else jnp.zeros((), x_mb.dtype)
        init = (
            # One pool of activation slots: saved layer inputs, or for zb_h1 / zb_v the kept layer-output
            # cotangents of a deferred W (one row per slot of a chunk).
            jnp.broadcast_to(zero_x[None, None], (sched.act_slots, L) + mb_shape),
            buffer(sched.g_slots),
            # Rows for the slots with a weight gradient only (``StageLayout.grad_rows``), trainable leaves only.
            # In the storage layout and dtype (FSDP-sharded, float32), whatever copy the ops use.
            [jnp.zeros_like(a[:G]) for a in split.split(stored_L)[0]] if trains else None,
            _zeros_like(lp),
            jnp.float32(0.0),
            # The device's slots of the input gradients and of the inputs (``parallel.conveyor``).
            dxs0,
            x_mb,
            # With overlap: last tick's outgoing activation and cotangent, and where each goes.
            (zero_x, zero_x, jnp.int32(-1), jnp.int32(-1)) if sched.overlap else None,
        )
        # What prepare_fn returns for each slot (zeros where nothing is prepared).
        made0 = None
        if prepare_fn is not None:
            shapes = jax.eval_shape(prepare_fn, prep_params, _index(prep_inputs, 0), x_mb[0])[1]
            made0 = jax.tree.map(lambda a: jnp.zeros((n_in,) + a.shape, a.dtype), shapes)
        encode_T = encode_T[:, 0]
        # Tick 0's message is made from the inputs as they start: a slot it moves has deadline -1, so no encode
        # writes it (``bubble_encode.check_plan``).
        init = init + (conveyor_message(x_mb, dxs0, sends_T[0]), made0)  # tick 0's, from the buffers as they start
        # Each tick also makes the next tick's conveyor message: its sends row rides along (none after the last).
        sends_next_T = jnp.concatenate([sends_T[1:], jnp.full_like(sends_T[:1], -1)], axis=0)
        (_, _, gacc, lpacc, loss, dxs, _, _, _, made), counts = jax.lax.scan(
            tick, init, (table_T, sends_T, sends_next_T, encode_T))
        for moving in conveyor.tail:  # the input gradients' last moves down the ring, to their inputs' devices
            idx = np.flatnonzero(moving)
            with jax.named_scope(CONVEYOR_SCOPE):
                dxs = dxs.at[idx].set(jax.lax.ppermute(dxs[idx], axis, ring_down))
        # Only the last stage has a loss and loss-parameter gradients.
        total = lambda t: jax.tree.map(lambda a: jax.lax.psum(a, axis), t)  # noqa: E731
        if trains and moves is not None:  # every slot's row (zeros without a weight gradient), back to storage
            has = active_L & (kind_L >= KIND_DW)
            full = [jnp.where(has.reshape((-1,) + (1,) * (a.ndim - 1)), jnp.take(a, rows_L, axis=0), 0).astype(a.dtype)
                    for a in gacc]
            gacc = _move_rows(full, moves, stage, axis, back=True)
        gout = jax.tree.map(lambda a: a[None], gacc) if trains else jnp.zeros((1,), jnp.int32)
        counts = (counts if trace else jnp.zeros((table_T.shape[0], len(TRACE_FIELDS)), jnp.int32))[:, None]
        made = jax.tree.map(lambda a: a[None], made) if made is not None else jnp.zeros((1,), jnp.int32)
        return gout, total(lpacc), total(loss), dxs[None] if want_dx else dxs, counts, made

    return per_device


def _as_row_of(value, buf):
    """``value`` laid out as a row of ``buf`` (its sharding over the mesh's other axes, without the row dimension)."""
    want = _spec_of(buf)[1:]
    if _spec_of(value) == want:
        return value
    return jax.sharding.reshard(value, P(*want))


def _write_row(buf, value, index: tuple, write):
    """buf[index] = value where ``write`` (a traced bool), else buf unchanged. No conditional around the buffer: a
    select of one row, written in place (a cond carrying the whole pool through its branches made XLA copy it)."""
    start = tuple(index) + (0,) * value.ndim
    size = (1,) * len(index) + value.shape
    old = jax.lax.dynamic_slice(buf, start, size)
    new = value.reshape(size).astype(buf.dtype)
    return jax.lax.dynamic_update_slice(buf, jnp.where(write, new, old), start)


def _store(buf, value, slot, row0: bool = False):
    """buf[slot] = value (row 0 of an activation slot with ``row0``: where a stage's input arrives); -1: nothing
    arrived."""
    return _write_row(buf, value, (jnp.maximum(slot, 0),) + ((0,) if row0 else ()), slot >= 0)


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
