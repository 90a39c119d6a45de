"""Pipeline schedules as data, and the simulator that prices them as the runtime runs them.

One home for the schedule: ``build_schedule`` makes the table [tick, stage] of ops that ``parallel.pipeline``
executes (each device reads its column inside one ``lax.scan``) and that the planner prices (``tick_costs`` /
``simulate``), so the two cannot drift.

Ops per stage and microbatch:
- F  forward of the stage's layers (the last stage also takes the loss and its cotangent);
- BW the fused backward (1F1B): each layer's vjp, input gradient (dX) and weight gradient (dW) together;
- B  the input gradient only (dX through the stage; each trainable layer's output cotangent is kept for W);
- W  the weight gradient only (dW of the stage's trainable layers from the kept cotangents);
- SKIP a backward of a stage with nothing to do (a frozen prefix): it keeps the pace and computes nothing.

The runtime is SPMD: every tick ends in the ``ppermute``s to the neighbours, so ticks run in lockstep and a tick
lasts as long as its slowest op. ``simulate`` sums exactly that; the asynchronous 1F1B formula
(M - 1) * max stage + sum of stages is what an event-driven runtime would take, not this one.

Schedules (``SCHEDULES``):
- "1f1b": stage s runs min(S - s - 1, M) warm-up forwards, then alternates F and BW, then the remaining BWs; a
  stage has at most min(S - s, M) microbatches forwarded and not yet backwarded (a later stage's next activation
  arrives a tick before its forward, so its pool has one slot more: ``Schedule.peak_act``).
- "zb_h1": 1F1B's order, but a stage that has weight gradients splits each backward after its last forward into
  B and a deferred W; the Ws run in the ticks where the stage would otherwise idle (the cool-down bubbles) and after
  its last B. A deferred W keeps its microbatch's saved inputs and one more slot of cotangents, so a backward is
  split only while the stage's live slots stay within 1F1B's peak for it: the same activation memory as 1F1B.
  (Zero Bubble Pipeline Parallelism, arXiv 2401.10241, ZB-H1, in lockstep ticks.)
- "1f1b_fb": 1F1B's ops, but a stage runs the forward of one microbatch and the fused backward of an earlier one in
  the same tick (OP_FB) as soon as both are ready: the steady state's ticks each cost F + BW of the slowest stage,
  which is the asynchronous 1F1B formula in lockstep, instead of 1F1B's max(F, BW) twice. The price is memory: a
  round trip takes twice as many ticks, so stage s holds up to 2 (S - s) - 1 microbatches (1F1B: S - s).
- "1f1b_sliced": 1F1B's order of ops on each stage, cut into slices of layers: every tick a stage runs as much of
  its stream of layer ops (its forward's layers, then its backward's in reverse, in 1F1B's order) as fits a budget of
  cost units (``Slicing``), at most one forward slice and one backward slice. A forward that does not fit continues
  in the next tick from the row of the pool its last slice wrote; a backward's cotangent is handed to the stage's
  own next slice. Frozen layers' backward costs about twice their forward, so 1F1B's lockstep ticks cost max(F, BW)
  = BW twice per microbatch; sliced ticks all cost about the budget, which takes the steady state from 2 BW towards
  F + BW per microbatch, with 1F1B's order and so 1F1B's activation memory (1F1B-FB gets there by holding twice the
  microbatches).
- "gpipe": all forwards, then all backwards (every microbatch in flight; a memory reference).
- "zb_v": two chunks per device placed as a V (``virtual_placement``), a greedy lockstep list schedule with B / W
  split in the cool-down, at most ``max_in_flight`` microbatches admitted: 1F1B's activation memory by default.
- "interleaved": Megatron-LM's virtual pipeline, V chunks per device in a ring (``interleaved_op_order``).

With ``overlap`` a message to another device travels during the tick after the one that made it (beside that
tick's ops) and is read a tick later; ``simulate`` then prices a tick as max(op, ppermute) instead of their sum.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, replace

import numpy as np

OP_IDLE, OP_F, OP_B, OP_W, OP_BW, OP_SKIP, OP_FB = range(7)
OP_CHARS = ".FBWXsP"  # for printing tables: X = fused backward, P = a forward and a fused backward paired in a tick
# Schedules over one chunk of layers per device, and over V chunks per device (the model's S x V virtual stages).
SCHEDULES = ("1f1b", "zb_h1", "1f1b_fb", "1f1b_sliced", "gpipe", "interleaved", "zb_v")
VIRTUAL_SCHEDULES = ("interleaved", "zb_v")
# What a run may ask for (ParallelConfig.pipeline_schedule, besides "auto"); GPipe is a memory reference only.
RUN_SCHEDULES = ("1f1b", "zb_h1", "1f1b_fb", "1f1b_sliced", "zb_v", "interleaved")
# Where a message goes: to the next device (d + 1, mod S), the previous one (d - 1, mod S), or the sender itself
# (two consecutive virtual stages on one device: the turn of the V).
TO_RIGHT, TO_LEFT, TO_SELF = 0, 1, 2
# Columns of the table. x_slot: the slot of saved layer inputs the op reads (and F on virtual stage 0 writes);
# g_slot: the arrived cotangent B / BW reads (on the last virtual stage: the loss cotangent its F made; -1 in a
# paired op whose backward is of the microbatch its forward half just made); w_slot: the slot of kept layer-output
# cotangents B writes and W reads. x and w slots share one pool per device (both hold one row per layer), so a
# deferred W costs no buffer 1F1B would not have. mb2 / x2_slot: the backward half of a paired op (OP_FB; its
# cotangent is in g_slot). chunk / virtual: which of the device's chunks the op runs and that chunk's virtual stage.
# x_to / g_to: where the op's activation / input cotangent goes (TO_*; -1: nowhere). recv_*: where this tick's
# arrivals are stored (-1: nothing arrives): recv_x_slot an activation moving right (from d - 1), recv_xl_slot one
# moving left (from d + 1), recv_xo_slot the device's own; recv_g_slot a cotangent moving left (from d + 1),
# recv_gr_slot one moving right (from d - 1), recv_go_slot the device's own (a local hand-over: the turn of a V, or
# a backward slice's cotangent).
# f_lo / f_hi: the layers [f_lo, f_hi) of the chunk the forward runs, b_lo / b_hi those the backward runs (from
# b_hi - 1 down): a slice of "1f1b_sliced" (-1: all of them). A forward slice that ends below the chunk's last layer
# writes its output to row f_hi of its slot (the next slice's input) and sends nothing; a backward slice that ends
# above layer 0 hands its cotangent to the device's own next slice (g_to = TO_SELF). recv_gl_slot: where the loss
# cotangent of the last virtual stage's forward is stored (beside a slice's hand-over in the same tick).
FIELDS = ("op", "mb", "x_slot", "g_slot", "recv_x_slot", "recv_g_slot", "w_slot", "mb2", "x2_slot", "chunk",
          "virtual", "x_to", "g_to", "recv_xl_slot", "recv_xo_slot", "recv_gr_slot", "recv_go_slot",
          "f_lo", "f_hi", "b_lo", "b_hi", "recv_gl_slot")


def virtual_stages_of(kind: str, virtual_stages: int | None = None) -> int:
    """Chunks per device of schedule ``kind``: 1, V for "interleaved" (default 2), 2 for "zb_v" (the V shape)."""
    if kind not in SCHEDULES:
        raise ValueError(f"schedule kind must be one of {SCHEDULES}; got {kind!r}")
    if kind == "zb_v":
        if virtual_stages not in (None, 2):
            raise ValueError(f"zb_v runs two chunks per device (the V shape); got virtual_stages={virtual_stages}")
        return 2
    if kind == "interleaved":
        v = 2 if virtual_stages is None else int(virtual_stages)
        if v < 2:
            raise ValueError(f"interleaved needs virtual_stages >= 2 chunks per device; got {virtual_stages}")
        return v
    if virtual_stages not in (None, 1):
        raise ValueError(f"schedule {kind!r} runs one chunk per device; got virtual_stages={virtual_stages} "
                         f"(use 'interleaved' or 'zb_v')")
    return 1


def virtual_placement(kind: str, stages: int, virtual_stages: int | None = None) -> np.ndarray:
    """int [S x V, 2]: (device, chunk) of each virtual stage k. Interleaved (Megatron-LM): chunk c of device d is
    k = c S + d, a ring. zb_v: the V shape, k < S on device k (chunk 0), then back from the last device to the first
    (chunk 1), so the loss is on device 0 and the turn is a local hand-over. Otherwise: stage k on device k."""
    S, V = stages, virtual_stages_of(kind, virtual_stages)
    k = np.arange(S * V)
    if kind == "zb_v":
        return np.stack([np.where(k < S, k, 2 * S - 1 - k), k // S], axis=1)
    return np.stack([k % S, k // S], axis=1)


@dataclass(frozen=True)
class Schedule:
    """table int32 [ticks, stages, len(FIELDS)], -1 = none. ``act_slots``: the per-device pool of activation slots
    (saved inputs + kept cotangents), ``g_slots``: arrived cotangents; ``peak_act`` [stages]: each stage's peak live
    activation slots."""

    table: np.ndarray
    act_slots: int
    g_slots: int
    peak_act: tuple
    kind: str
    virtual_stages: int = 1
    overlap: bool = False  # cross-device messages travel during the next tick (``build_schedule(overlap=True)``)
    slicing: "Slicing | None" = None  # "1f1b_sliced": how the stages' ops were cut into ticks

    @property
    def chunks(self) -> np.ndarray:
        return self.column("chunk")

    def column(self, field: str) -> np.ndarray:
        return self.table[:, :, FIELDS.index(field)]

    @property
    def ops(self) -> np.ndarray:
        return self.column("op")

    @property
    def stages(self) -> int:
        """Devices (pipeline ranks); each runs ``virtual_stages`` of the model's chunks."""
        return self.table.shape[1]

    def format(self) -> str:
        """One line per tick: the op letter and microbatch of every stage (and its chunk, interleaved: F0.1)."""
        ops, mbs, cs = self.ops, self.column("mb"), self.chunks

        def cell(o, m, c):
            return OP_CHARS[o] + ("" if m < 0 else str(m)) + (f".{c}" if self.virtual_stages > 1 and m >= 0 else "")

        return "\n".join(f"{t:3d} " + " ".join(cell(*e) for e in zip(ops[t], mbs[t], cs[t]))
                         for t in range(ops.shape[0]))


def stage_op_order(stages: int, microbatches: int, kind: str = "1f1b", lag: int = 1) -> list:
    """Per stage, the ordered list of (op, microbatch) with the backward as OP_BW (zb_h1 splits some of them when
    it places them). 1F1B / ZB-H1: min(lag (stages - s - 1), M) warm-up forwards (``lag`` 2: a neighbour's result
    arrives a tick later, so a round trip takes twice the ticks and keeps twice the microbatches in flight), then
    one forward and one backward alternately, then the remaining backwards. GPipe: all forwards, then all
    backwards."""
    if kind not in SCHEDULES:
        raise ValueError(f"schedule kind must be one of {SCHEDULES}; got {kind!r}")
    orders = []
    for s in range(stages):
        if kind == "gpipe":
            orders.append([(OP_F, m) for m in range(microbatches)] + [(OP_BW, m) for m in range(microbatches)])
            continue
        warm = min(lag * (stages - s - 1), microbatches)
        order = [(OP_F, m) for m in range(warm)]
        nf, nb = warm, 0
        while nb < microbatches:
            if nf < microbatches:
                order.append((OP_F, nf))
                nf += 1
            order.append((OP_BW, nb))
            nb += 1
        orders.append(order)
    return orders


def one_f_one_b_peak(stage: int, stages: int, microbatches: int) -> int:
    """Microbatches of saved inputs a 1F1B stage holds at its peak: its warm-up forwards + 1, capped at M."""
    return min(microbatches, stages - stage)


def _arrived(done: int, t: int, lag: int) -> bool:
    """A result made at tick ``done`` is usable at tick ``t``: ``lag`` = 1, the message arrives at the end of its
    tick; 2, its ppermute runs during the next tick, beside that tick's compute (``build_schedule(overlap=True)``)."""
    return 0 <= done and done + lag <= t


def _place(stages, M, bw, ws, kind, lag=1):
    """Assign every stage's ops to ticks (list of rows of (op, m)). An op runs at the first tick its dependency
    finished before (F: the previous stage's F of the microbatch; a backward: the next stage's backward, or on the
    last stage its own F); zb_h1 fills a stage's otherwise idle ticks with its deferred Ws."""
    orders = stage_op_order(stages, M, kind, lag)
    last_f = [max(i for i, (op, _) in enumerate(o) if op == OP_F) for o in orders]
    # Every device's buffer pool has 1F1B's largest stage's slots (SPMD: one shape for all): a deferred W may use
    # them on any stage at no memory cost.
    cap = [one_f_one_b_peak(0, stages, M)] * stages
    done_f = np.full((stages, M), -1)
    done_b = np.full((stages, M), -1)
    pos = [0] * stages
    pending_w = [[] for _ in range(stages)]
    live = [0] * stages  # activation slots in use: microbatches forwarded and not yet freed, + kept cotangents
    rows, t = [], 0
    while any(pos[s] < len(orders[s]) or pending_w[s] for s in range(stages)):
        row = [(OP_IDLE, -1)] * stages
        for s in range(stages):
            op, m = orders[s][pos[s]] if pos[s] < len(orders[s]) else (None, -1)
            if op == OP_F:
                ready = s == 0 or _arrived(done_f[s - 1, m], t, lag)
            elif op == OP_BW:
                ready = (0 <= done_f[s, m] < t) if s == stages - 1 else _arrived(done_b[s + 1, m], t, lag)
            else:
                ready = False
            if ready:
                if op == OP_F:
                    row[s] = (OP_F, m)
                    live[s] += 1 if bw[s] else 0
                elif not bw[s]:
                    row[s] = (OP_SKIP, m)
                elif kind == "zb_h1" and ws[s] and pos[s] > last_f[s] and live[s] + 1 <= cap[s]:
                    row[s] = (OP_B, m)
                    pending_w[s].append(m)
                    live[s] += 1  # the kept cotangents; the saved inputs stay until W
                else:
                    row[s] = (OP_BW, m)
                    live[s] -= 1
                pos[s] += 1
            elif pending_w[s]:
                row[s] = (OP_W, pending_w[s].pop(0))
                live[s] -= 2
        for s, (op, m) in enumerate(row):
            if op == OP_F:
                done_f[s, m] = t
            elif op in (OP_B, OP_BW, OP_SKIP):
                done_b[s, m] = t
        rows.append(row)
        t += 1
        if t > 8 * (stages + M) + 8:
            raise AssertionError("schedule did not converge")  # unreachable: every order is dependency-sorted
    return rows


def paired_peak(stage: int, stages: int, microbatches: int) -> int:
    """Activation slots a 1f1b_fb stage holds at its peak: a microbatch's forward-to-backward round trip is
    2 (S - 1 - s) ticks long and one forward starts every tick, so 2 (S - s) - 1 (1F1B: S - s), capped at M."""
    return min(microbatches, 2 * (stages - stage) - 1)


def _place_paired(stages, M, bw, lag=1):
    """1f1b_fb: every tick, each stage runs its next forward and its next backward when each is ready (the last
    stage may run a microbatch's backward in the tick of its forward: the forward half runs first). A stage without
    a backward (a frozen prefix) has no backward ops; its forwards wait while the next stage has no free slot."""
    cap = max(paired_peak(s, stages, M) for s in range(stages))
    done_f = np.full((stages, M), -1)
    done_b = np.full((stages, M), -1)
    nf, nb = [0] * stages, [0] * stages
    live = [0] * stages
    rows, t = [], 0
    while any(nf[s] < M or (bw[s] and nb[s] < M) for s in range(stages)):
        row = [(OP_IDLE, -1)] * stages
        arrivals = []
        for s in range(stages):
            f_m = nf[s] if nf[s] < M else None
            if f_m is not None:
                ready = s == 0 or _arrived(done_f[s - 1, f_m], t, lag)
                room = (s == stages - 1 or live[s + 1] < cap) and (s > 0 or not bw[0] or live[0] < cap)
                f_m = f_m if ready and room else None
            b_m = nb[s] if bw[s] and nb[s] < M else None
            if b_m is not None:
                if s == stages - 1:
                    ready = 0 <= done_f[s, b_m] < t or f_m == b_m
                else:
                    ready = _arrived(done_b[s + 1, b_m], t, lag)
                b_m = b_m if ready else None
            if f_m is not None:
                nf[s] += 1
                done_f[s, f_m] = t
                if s == 0 and bw[0]:
                    live[0] += 1
                elif s > 0 and not bw[s]:
                    live[s] -= 1  # read and freed by the forward
                if s + 1 < stages:
                    arrivals.append(s + 1)
            if b_m is not None:
                nb[s] += 1
                done_b[s, b_m] = t
                live[s] -= 1
            if f_m is not None and b_m is not None:
                row[s] = (OP_FB, f_m, b_m)
            elif f_m is not None:
                row[s] = (OP_F, f_m)
            elif b_m is not None:
                row[s] = (OP_BW, b_m)
        for s in arrivals:
            live[s] += 1
        rows.append(row)
        t += 1
        if t > 8 * (stages + M) + 8:
            raise AssertionError("schedule did not converge")  # unreachable: backwards always progress
    return rows


@dataclass(frozen=True)
class Slicing:
    """How "1f1b_sliced" cuts each stage's ops into ticks. ``forward_units`` / ``backward_units``: per stage, per
    layer, what the layer's forward / backward costs in whole units (the last stage's last layer's forward includes
    the loss head; a backward of 0: the layer has none, a frozen prefix); ``budget``: the units one tick holds (a
    layer that alone exceeds it still runs, alone). Whole numbers, so the table the planner prices with its costs is
    the one the runtime builds from the same numbers (``units_from_costs``)."""

    forward_units: tuple
    backward_units: tuple
    budget: int

    def __post_init__(self):
        fw = tuple(tuple(int(u) for u in v) for v in self.forward_units)
        bw = tuple(tuple(int(u) for u in v) for v in self.backward_units)
        if not fw or [len(v) for v in fw] != [len(v) for v in bw] or min(len(v) for v in fw) < 1:
            raise ValueError(f"Slicing needs forward and backward units for the same stages, one per layer (>= 1 "
                             f"layer each); got {len(fw)} stages of {[len(v) for v in fw]} forward and "
                             f"{[len(v) for v in bw]} backward layers")
        if min(min(v) for v in fw) < 1 or min(min(v) for v in bw) < 0:
            raise ValueError(f"Slicing units must be >= 1 per forward and >= 0 per backward layer; got {fw}, {bw}")
        if not int(self.budget) >= 1:
            raise ValueError(f"Slicing.budget must be >= 1 unit; got {self.budget!r}")
        object.__setattr__(self, "forward_units", fw)
        object.__setattr__(self, "backward_units", bw)
        object.__setattr__(self, "budget", int(self.budget))

    @property
    def stage_layers(self) -> tuple:
        return tuple(len(v) for v in self.forward_units)


def backward_units(dx: bool, dw: bool) -> int:
    """A layer's backward in forward units as the runtime runs it (remat per layer): the recomputed forward, plus one
    for the input gradient and one for the weight gradient; nothing when it has neither (a frozen prefix)."""
    return 0 if not (dx or dw) else 1 + int(bool(dx)) + int(bool(dw))


def default_slicing(stage_layers, backward_stages=None, budget: int = 2) -> Slicing:
    """Every layer's forward 1 unit, its backward 2 (a frozen layer's input gradient, remat) where the stage has a
    backward; a tick of ``budget`` units: one such backward layer, or two forwards."""
    bw = [True] * len(stage_layers) if backward_stages is None else [bool(b) for b in backward_stages]
    return Slicing(tuple((1,) * int(n) for n in stage_layers),
                   tuple((backward_units(True, False) if b else 0,) * int(n) for n, b in zip(stage_layers, bw)),
                   budget)


def _place_sliced(stages, M, bw, slicing: Slicing, lag=1):
    """1f1b_sliced: each stage walks 1F1B's order of ops layer by layer, and every tick takes as many of the next
    layers as fit ``slicing.budget`` (at least one when the tick has nothing else), starting an op only once its
    dependency is met (as in ``_place``) and at most one forward slice and one backward slice per tick. Rows of
    (op, microbatch, paired backward's microbatch, chunk, f_lo, f_hi, b_lo, b_hi)."""
    S = stages
    if len(slicing.stage_layers) != S:
        raise ValueError(f"the slicing has {len(slicing.stage_layers)} stages; the schedule has {S}")
    orders = stage_op_order(S, M, "1f1b", lag)
    n = slicing.stage_layers
    pos, walked = [0] * S, [0] * S  # the next op, and the layers of it already run
    done_f = np.full((S, M), -1)
    done_b = np.full((S, M), -1)
    # Stage 0 takes a microbatch's slot when its forward starts, and a slice's forward half runs before its backward
    # half: a forward may start only while the slots held before the tick are fewer than 1F1B's peak there (its
    # warm-up + 1), so that a backward ending in the same tick does not make it hold one more.
    held0, cap0 = 0, min(lag * (S - 1) + 1, M)
    rows, t = [], 0
    while any(pos[s] < len(orders[s]) for s in range(S)):
        row = []
        freed0 = 0
        for s in range(S):
            used, fwd, back = 0, None, None
            while pos[s] < len(orders[s]):
                op, m = orders[s][pos[s]]
                is_f = op == OP_F
                if (fwd if is_f else back) is not None:
                    break
                if walked[s] == 0:
                    if is_f:
                        ready = _arrived(done_f[s - 1, m], t, lag) if s else (held0 < cap0 or not bw[0])
                    elif s == S - 1:  # its own forward: before, or in this tick (the forward slice runs first)
                        ready = done_f[s, m] >= 0
                    else:
                        ready = _arrived(done_b[s + 1, m], t, lag)
                    if not ready:
                        break
                units = slicing.forward_units[s] if is_f else (slicing.backward_units[s] if bw[s] else (0,) * n[s])
                walk = units if is_f else units[::-1]  # a backward walks the layers from the top
                start = took = walked[s]
                while took < n[s] and (used + walk[took] <= slicing.budget or (took == start and used == 0)):
                    used += walk[took]
                    took += 1
                if took == start:
                    break
                if is_f:
                    fwd = (m, start, took)
                    held0 += s == 0 and start == 0
                else:
                    back = (m, n[s] - took, n[s] - start)
                if took < n[s]:
                    walked[s] = took
                    break  # the op goes on next tick
                walked[s] = 0
                pos[s] += 1
                if is_f:
                    done_f[s, m] = t
                else:
                    done_b[s, m] = t
                    freed0 += s == 0
                if used >= slicing.budget:
                    break
            skip = None
            if back is not None and not bw[s]:  # a stage without backward: its backward keeps the pace, runs nothing
                back, skip = None, back[0]
            if fwd and back:
                row.append((OP_FB, fwd[0], back[0], 0, *fwd[1:], *back[1:]))
            elif fwd:
                row.append((OP_F, fwd[0], -1, 0, *fwd[1:], -1, -1))
            elif back:
                row.append((OP_BW, back[0], -1, 0, -1, -1, *back[1:]))
            elif skip is not None:
                row.append((OP_SKIP, skip, -1, 0, -1, -1, -1, -1))
            else:
                row.append((OP_IDLE, -1, -1, 0, -1, -1, -1, -1))
        held0 -= freed0
        rows.append(row)
        t += 1
        if t > 8 * (S + M) * (max(n) + 1) + 8:
            raise AssertionError("sliced schedule did not converge")  # unreachable: every order is dependency-sorted
    return rows


def interleaved_op_order(stages: int, virtual_stages: int, microbatches: int) -> list:
    """Per device, the ordered list of (op, chunk, microbatch) of interleaved 1F1B (Megatron-LM's virtual pipeline;
    chunk c of device d is virtual stage c S + d). Forwards take the microbatches in groups of S, each group through
    chunk 0, then chunk 1, ...; backwards take the same groups through the chunks in reverse. Device d runs
    2 (S - d - 1) + (V - 1) S warm-up forwards, then alternates one forward and one backward."""
    S, V, M = stages, virtual_stages, microbatches
    if M % S:
        raise ValueError(f"interleaved takes the microbatches in groups of the {S} pipeline stages: microbatches "
                         f"must be a multiple of {S}; got {M}")
    total = M * V

    def seq(k, backward):
        group, r = divmod(k, S * V)
        c = r // S
        return (V - 1 - c if backward else c), group * S + r % S

    orders = []
    for d in range(S):
        warm = min(2 * (S - d - 1) + (V - 1) * S, total)
        order = [(OP_F, *seq(i, False)) for i in range(warm)]
        nf, nb = warm, 0
        while nb < total:
            if nf < total:
                order.append((OP_F, *seq(nf, False)))
                nf += 1
            order.append((OP_BW, *seq(nb, True)))
            nb += 1
        orders.append(order)
    return orders


def _virtual_index(place) -> dict:
    """(device, chunk) -> virtual stage, from ``virtual_placement``'s [S x V, 2] table."""
    return {(int(d), int(c)): k for k, (d, c) in enumerate(place)}


def _forward_ready(done_f, place, k, m, t, lag) -> bool:
    """Virtual stage k > 0 may forward microbatch m at tick t: k - 1 forwarded it, and its activation has arrived
    (a neighbour's after ``lag`` ticks, a hand-over on one device after one)."""
    return _arrived(done_f[k - 1, m], t, lag if place[k - 1, 0] != place[k, 0] else 1)


def _backward_ready(done_f, done_b, place, k, m, t, lag) -> bool:
    """Virtual stage k may run microbatch m's backward at tick t: the last one after its own forward, the others
    once k + 1's input cotangent has arrived."""
    if k == len(place) - 1:
        return 0 <= done_f[k, m] < t
    return _arrived(done_b[k + 1, m], t, lag if place[k + 1, 0] != place[k, 0] else 1)


def _place_in_order(place, M, bw, orders, lag=1):
    """Lockstep ticks of per-device op orders over virtual stages: every device runs its next op at the first tick
    its dependency finished before (F of virtual stage k: k - 1's F of the microbatch; a backward: k + 1's backward,
    or on the last virtual stage its own F). Rows of (op, microbatch, -1, chunk)."""
    S, K = int(place[:, 0].max()) + 1, len(place)
    virtual = _virtual_index(place)
    done_f = np.full((K, M), -1)
    done_b = np.full((K, M), -1)
    pos = [0] * S
    rows, t = [], 0
    while any(pos[d] < len(orders[d]) for d in range(S)):
        row = [(OP_IDLE, -1, -1, 0)] * S
        for d in range(S):
            if pos[d] == len(orders[d]):
                continue
            op, c, m = orders[d][pos[d]]
            k = virtual[(d, c)]
            if op == OP_F:
                ready = k == 0 or _forward_ready(done_f, place, k, m, t, lag)
            else:
                ready = _backward_ready(done_f, done_b, place, k, m, t, lag)
            if ready:
                row[d] = (op if op == OP_F or bw[k] else OP_SKIP, m, -1, c)
                pos[d] += 1
        for d, (op, m, _, c) in enumerate(row):
            if op == OP_F:
                done_f[virtual[(d, c)], m] = t
            elif op in (OP_BW, OP_SKIP):
                done_b[virtual[(d, c)], m] = t
        rows.append(row)
        t += 1
        if t > 8 * (K + M * K) + 8:
            raise AssertionError(f"schedule did not converge (stages={S}, virtual stages={K}, M={M})")
    return rows


def _place_v(place, M, bw, ws, max_in_flight, lag=1):
    """zb_v in lockstep ticks: each tick every device runs one ready op, by priority: a backward (the oldest
    microbatch; once the device has run all its forwards, split into B now and a deferred W when the virtual stage
    has weight gradients and the device has a spare slot for the kept cotangents: W then fills the cool-down, where
    splitting earlier only adds the second recompute), else a forward (of a microbatch already admitted first, the
    latest virtual stage first), else a deferred W. At most ``max_in_flight`` microbatches are admitted and not yet
    fully backwarded, so a device holds at most 2 inputs per microbatch (its two chunks): the activation memory of
    1F1B with that many in flight, in slots of half a stage. (Zero Bubble Pipeline Parallelism's V shape, arXiv
    2401.10241 / 2405.15362, as a greedy lockstep list schedule.)"""
    S, K = int(place[:, 0].max()) + 1, len(place)
    virtual = _virtual_index(place)
    cap = 2 * max_in_flight
    done_f = np.full((K, M), -1)
    done_b = np.full((K, M), -1)
    f_next = np.zeros(K, int)  # per virtual stage: the next microbatch to forward (all in order)
    b_next = np.zeros(K, int)
    admitted = finished = 0
    pending_w = [[] for _ in range(S)]
    kept = [0] * S
    rows, t = [], 0
    stages_of = [[k for k in range(K) if place[k, 0] == d] for d in range(S)]
    while finished < M or any(pending_w):
        row = [(OP_IDLE, -1, -1, 0)] * S
        # Slots each device may still need for the admitted microbatches: one per own chunk not yet backwarded,
        # and two per deferred W (its saved inputs and its kept cotangents). A microbatch is admitted only while
        # every device has room for it, so no arrival can overflow the pool.
        held = [sum(int(admitted - b_next[k]) for k in stages_of[d]) + 2 * kept[d] for d in range(S)]
        room = admitted - finished < max_in_flight and all(held[d] + len(stages_of[d]) <= cap for d in range(S))
        for d in range(S):
            back = []
            for k in stages_of[d]:
                m = b_next[k]
                if m < M and _backward_ready(done_f, done_b, place, k, m, t, lag):
                    back.append((m, -k))
            if back:
                m, k = min(back)
                k = -k
                if not bw[k]:
                    op = OP_SKIP
                elif ws[k] and held[d] + 1 <= cap and all(f_next[j] == M for j in stages_of[d]):
                    op = OP_B
                    pending_w[d].append((int(place[k, 1]), m))
                    kept[d] += 1
                else:
                    op = OP_BW
                row[d] = (op, m, -1, int(place[k, 1]))
                continue
            fwd = []
            for k in stages_of[d]:
                m = f_next[k]
                if m < M and (_forward_ready(done_f, place, k, m, t, lag) if k > 0 else room):
                    fwd.append((m, -k))
            if fwd:
                m, k = min(fwd)
                row[d] = (OP_F, m, -1, int(place[-k, 1]))
            elif pending_w[d]:
                c, m = pending_w[d].pop(0)
                kept[d] -= 1
                row[d] = (OP_W, m, -1, c)
        for d, (op, m, _, c) in enumerate(row):
            if op == OP_IDLE or op == OP_W:
                continue
            k = virtual[(d, c)]
            if op == OP_F:
                done_f[k, m] = t
                f_next[k] += 1
                admitted += k == 0
            else:
                done_b[k, m] = t
                b_next[k] += 1
                finished += k == 0
        rows.append(row)
        t += 1
        if t > 16 * (K + M) * 2 + 8:
            raise AssertionError(f"zb_v schedule did not converge (stages={S}, M={M})")
    return rows


def build_schedule(stages: int, microbatches: int, *, backward_stages=None, weight_stages=None,
                   kind: str = "1f1b", virtual_stages: int | None = None,
                   max_in_flight: int | None = None, overlap: bool = False,
                   slicing: Slicing | None = None) -> Schedule:
    """The table the runtime executes. ``stages``: devices of the pipeline; "interleaved" and "zb_v" run V chunks
    per device, the model's S x V virtual stages (``virtual_placement``). ``backward_stages[k]`` False: virtual
    stage k has no backward (a frozen prefix; its backwards stay in the table as OP_SKIP to keep the pace, so nothing
    piles up downstream, and send nothing). ``weight_stages[k]`` False: virtual stage k has no weight gradient (only
    frozen layers), so zb_h1 / zb_v never split its backward. ``max_in_flight``: zb_v's admitted microbatches
    (default min(S, M), 1F1B's on its first stage; with ``overlap`` min(2 S - 1, M), as 1F1B's deeper warm-up).
    ``overlap``: a message to another device travels during the tick after the one that made it (its ``ppermute``
    beside that tick's compute, off the critical path) and is stored at that tick's end, so an op waits one tick
    more for a neighbour's result; a hand-over on one device is not delayed. Buffer slots, one pool per device: the
    saved inputs of a (chunk, microbatch) occupy an activation slot from their arrival (F on virtual stage 0) until
    BW or W, kept cotangents one from B until W; an arrived cotangent (or the last stage's loss cotangent) a g slot
    until B / BW reads it. ``slicing``: how "1f1b_sliced" cuts the ops into ticks (None: ``default_slicing`` of one
    layer per stage); only that schedule takes one."""
    if stages < 1 or microbatches < 1:
        raise ValueError(f"stages and microbatches must be >= 1; got {stages} and {microbatches}")
    V = virtual_stages_of(kind, virtual_stages)
    place = virtual_placement(kind, stages, V)
    S, M, K = stages, microbatches, stages * V
    bw = np.ones(K, bool) if backward_stages is None else np.asarray(backward_stages, bool)
    ws = bw.copy() if weight_stages is None else np.asarray(weight_stages, bool) & bw
    for name, v in (("backward_stages", bw), ("weight_stages", ws)):
        if v.shape != (K,):
            raise ValueError(f"{name} must have {K} entries (one per virtual stage); got shape {v.shape}")
    lag = 2 if overlap else 1
    if slicing is not None and kind != "1f1b_sliced":
        raise ValueError(f"a slicing cuts the ops of schedule '1f1b_sliced' into ticks; got one with {kind!r}")
    if kind == "1f1b_sliced":
        slicing = default_slicing((1,) * S, bw) if slicing is None else slicing
        rows = _place_sliced(S, M, bw, slicing, lag)
    elif kind == "interleaved":
        rows = _place_in_order(place, M, bw, interleaved_op_order(S, V, M), lag)
    elif kind == "zb_v":
        # 1F1B's microbatches in flight; with overlap twice the round trip, as 1F1B's deeper warm-up.
        n = min(S if lag == 1 else 2 * S - 1, M) if max_in_flight is None else int(max_in_flight)
        if n < 1:
            raise ValueError(f"max_in_flight must be >= 1; got {max_in_flight}")
        rows = _place_v(place, M, bw, ws, n, lag)
    elif kind == "1f1b_fb":
        rows = _place_paired(S, M, bw, lag)
    else:
        rows = _place(S, M, bw, ws, kind, lag)
    # One entry form: (op, microbatch, paired backward's microbatch, chunk, f_lo, f_hi, b_lo, b_hi); -1: the whole
    # chunk.
    rows = [[tuple(e) if len(e) == 8 else (tuple(e) if len(e) == 4 else (tuple(e) + (-1,))[:3] + (0,)) + (-1,) * 4
             for e in row] for row in rows]
    n_layers = slicing.stage_layers if slicing is not None else None

    T = len(rows)
    table = np.full((T, S, len(FIELDS)), -1, np.int32)
    col = {f: i for i, f in enumerate(FIELDS)}
    virtual = _virtual_index(place)
    # Per device: (chunk, microbatch) -> its activation slot of saved inputs / of kept cotangents / its g slot.
    x_of = [dict() for _ in range(S)]
    w_of = [dict() for _ in range(S)]
    g_of = [dict() for _ in range(S)]
    a_free, g_free = [set() for _ in range(S)], [set() for _ in range(S)]
    a_count, g_count = [0] * S, [0] * S
    live, peak = [0] * S, [0] * S

    def alloc(free, count, d):
        if free[d]:
            slot = min(free[d])
            free[d].remove(slot)
            return slot
        count[d] += 1
        return count[d] - 1

    def take(d):
        live[d] += 1
        peak[d] = max(peak[d], live[d])
        return alloc(a_free, a_count, d)

    def release(d, slot):
        live[d] -= 1
        a_free[d].add(slot)

    arriving = defaultdict(list)  # tick -> messages stored at its end

    def direction(d, d2):
        if d2 == d:
            return TO_SELF
        return TO_RIGHT if d2 == (d + 1) % S else TO_LEFT

    def ends(d, c, lo, hi):
        """(a forward slice [lo, hi) starts the chunk, ends it; a backward slice ends at its bottom): -1 = all."""
        n = n_layers[virtual[(d, c)]] if n_layers is not None else None
        return lo <= 0, hi < 0 or n is None or hi == n

    for t, row in enumerate(rows):
        for d, (op, m, m2, c, f_lo, f_hi, b_lo, b_hi) in enumerate(row):
            k = virtual.get((d, c), -1)
            for name, v in (("op", op), ("mb", m), ("chunk", c), ("virtual", k), ("f_lo", f_lo), ("f_hi", f_hi),
                            ("b_lo", b_lo), ("b_hi", b_hi)):
                table[t, d, col[name]] = v
            key = (c, m)
            if op in (OP_F, OP_FB):
                first, last = ends(d, c, f_lo, f_hi)
                if k == 0 and first:  # virtual stage 0 reads the input directly; keep it for its backward
                    # (without one, the forward still writes its layer inputs somewhere: a slot nobody counts, free
                    # again once its last slice has run)
                    x_of[d][key] = take(d) if bw[k] else alloc(a_free, a_count, d)
                table[t, d, col["x_slot"]] = x_of[d][key]
                if not bw[k] and last:  # no backward: the slot is free once the forward has read it
                    slot = x_of[d].pop(key)
                    (a_free[d].add(slot) if k == 0 else release(d, slot))
            if op in (OP_FB, OP_B, OP_BW):
                # The backward (of a paired op: its second half, after the forward half has taken its slot).
                key2 = (c, m2) if op == OP_FB else key
                done = b_lo <= 0  # the last slice (or the whole backward): the saved inputs are free after it
                if op == OP_FB:
                    table[t, d, col["mb2"]] = m2
                table[t, d, col["x2_slot" if op == OP_FB else "x_slot"]] = x_of[d][key2]
                if key2 in g_of[d]:  # else (paired): the loss cotangent the forward half just made
                    table[t, d, col["g_slot"]] = g_of[d][key2]
                    g_free[d].add(g_of[d].pop(key2))
                if op == OP_B:
                    w_of[d][key] = take(d)
                    table[t, d, col["w_slot"]] = w_of[d][key]
                elif done:
                    release(d, x_of[d].pop(key2))
            elif op == OP_W:
                table[t, d, col["x_slot"]] = x_of[d][key]
                table[t, d, col["w_slot"]] = w_of[d][key]
                release(d, x_of[d].pop(key))
                release(d, w_of[d].pop(key))
        # Messages are stored at the end of the tick they arrive in, after every op of the tick has read its
        # buffers: a hand-over on one device at the end of its tick, one to another device ``lag`` - 1 ticks later.
        # A device receives at most one message of each kind per channel (from d - 1, from d + 1, its own) and tick.
        for d, (op, m, m2, c, f_lo, f_hi, b_lo, b_hi) in enumerate(row):
            k = virtual.get((d, c), -1)
            forward_done = op in (OP_F, OP_FB) and ends(d, c, f_lo, f_hi)[1]
            if forward_done and k + 1 < K:
                d2, c2 = (int(v) for v in place[k + 1])
                to = direction(d, d2)
                table[t, d, col["x_to"]] = to
                arriving[t + (0 if to == TO_SELF else lag - 1)].append(("x", to, d2, (c2, m)))
            if forward_done and k == K - 1 and bw[k] and not (op == OP_FB and m2 == m):
                arriving[t].append(("loss", TO_SELF, d, (c, m)))  # the loss cotangent, for this stage's backward
            mb_back = m2 if op == OP_FB else m
            if op in (OP_B, OP_BW, OP_FB) and b_lo > 0:  # a slice above the bottom: to the stage's next slice
                table[t, d, col["g_to"]] = TO_SELF
                arriving[t].append(("g", TO_SELF, d, (c, mb_back)))
            elif op in (OP_B, OP_BW, OP_FB) and k > 0 and bw[k - 1]:
                d2, c2 = (int(v) for v in place[k - 1])
                to = direction(d, d2)
                table[t, d, col["g_to"]] = to
                arriving[t + (0 if to == TO_SELF else lag - 1)].append(("g", to, d2, (c2, mb_back)))
        for what, to, d2, key in arriving.pop(t, ()):
            if what == "x":
                x_of[d2][key] = take(d2)
                table[t, d2, col[("recv_x_slot", "recv_xl_slot", "recv_xo_slot")[to]]] = x_of[d2][key]
            else:
                g_of[d2][key] = alloc(g_free, g_count, d2)
                field = "recv_gl_slot" if what == "loss" else ("recv_gr_slot", "recv_g_slot", "recv_go_slot")[to]
                table[t, d2, col[field]] = g_of[d2][key]
    assert not arriving, "a message arrives after the last tick"  # unreachable: every message is read
    return Schedule(table, max(1, max(a_count)), max(1, max(g_count)), tuple(peak), kind, V, bool(overlap), slicing)


# ----------------------------------------------------------------------------------------------------------------
# The simulator: the lockstep runtime's step time from per-stage op costs.


@dataclass(frozen=True)
class StageOps:
    """Per-stage cost of one op on one microbatch: forward, input-gradient backward, weight-gradient backward, and
    the fused backward (what BW costs; with per-layer remat it is not b + w: B and W each recompute).
    ``f_layers`` / ``bw_layers``: per stage, its layers' forward (the last stage's last one with the loss head) and
    fused-backward costs, summing to ``f`` / ``bw``: what "1f1b_sliced" cuts its ticks from (empty: one layer per
    stage)."""

    f: tuple
    b: tuple
    w: tuple
    bw: tuple
    f_layers: tuple = ()
    bw_layers: tuple = ()

    def __post_init__(self):
        n = len(self.f)
        if n < 1 or any(len(v) != n for v in (self.b, self.w, self.bw)):
            raise ValueError(f"StageOps needs equal-length per-stage costs; got {len(self.f)}, {len(self.b)}, "
                             f"{len(self.w)}, {len(self.bw)}")
        if (self.f_layers or self.bw_layers) and (len(self.f_layers) != n or [len(v) for v in self.f_layers]
                                                   != [len(v) for v in self.bw_layers]):
            raise ValueError(f"StageOps' f_layers and bw_layers need one entry per layer of each of the {n} stages; "
                             f"got {[len(v) for v in self.f_layers]} and {[len(v) for v in self.bw_layers]}")

    @property
    def stages(self) -> int:
        return len(self.f)

    @property
    def has_backward(self) -> tuple:
        return tuple(bool(b > 0 or w > 0 or x > 0) for b, w, x in zip(self.b, self.w, self.bw))

    @property
    def has_weight(self) -> tuple:
        return tuple(bool(w > 0) for w in self.w)

    def layers(self) -> tuple:
        """(per-stage per-layer forward costs, fused-backward costs): ``f_layers`` / ``bw_layers``, or one layer per
        stage."""
        if self.f_layers:
            return self.f_layers, self.bw_layers
        return tuple((f,) for f in self.f), tuple((b,) for b in self.bw)

    def scaled(self, factor: float) -> "StageOps":
        """Every cost times ``factor`` (e.g. FLOPs -> seconds)."""
        mul = lambda v: tuple(x * factor for x in v)  # noqa: E731
        return StageOps(*(mul(getattr(self, k)) for k in ("f", "b", "w", "bw")),
                        tuple(mul(v) for v in self.f_layers), tuple(mul(v) for v in self.bw_layers))


def units_from_costs(ops: StageOps, budget: int) -> Slicing:
    """The slicing of ``ops``' layers in whole units of the median layer forward (a layer with a backward costs at
    least 1), ticks of ``budget`` units."""
    f_layers, bw_layers = ops.layers()
    unit = float(np.median([x for v in f_layers for x in v])) or 1.0
    return Slicing(tuple(tuple(max(1, round(x / unit)) for x in v) for v in f_layers),
                   tuple(tuple(max(1, round(x / unit)) if x > 0 else 0 for x in v) for v in bw_layers), budget)


def slicing_budgets(sl: Slicing) -> tuple:
    """The budgets worth pricing for the units of ``sl``: every one up to 16 units (a layer that alone exceeds the
    budget runs alone, so a budget below the loss head's layer still slices the others), then four more up to the
    busiest stage's forward + backward (a tick that holds a whole F and BW)."""
    hi = max(sum(f) + sum(b) for f, b in zip(sl.forward_units, sl.backward_units))
    small = range(1, min(hi, 16) + 1)
    return tuple(sorted(set(small) | {int(round(x)) for x in np.linspace(16, hi, 4)} if hi > 16 else set(small)))


def tick_costs(schedule: Schedule, ops: StageOps) -> np.ndarray:
    """[ticks, stages]: what each stage's op of each tick costs (``ops`` per virtual stage: an interleaved device's op
    costs what its chunk's virtual stage does; a slice of "1f1b_sliced" what its layers do)."""
    S, V = schedule.stages, schedule.virtual_stages
    if ops.stages != S * V:
        raise ValueError(f"StageOps has {ops.stages} stages but the schedule has {S * V} "
                         f"({S} stages x {V} virtual)")
    by_op = np.zeros((len(OP_CHARS), ops.stages))
    by_op[OP_F], by_op[OP_B], by_op[OP_W], by_op[OP_BW] = ops.f, ops.b, ops.w, ops.bw
    by_op[OP_FB] = np.asarray(ops.f) + np.asarray(ops.bw)
    costs = by_op[schedule.ops.astype(np.int64), np.maximum(schedule.column("virtual"), 0)]
    if schedule.slicing is None:
        return costs
    f_layers, bw_layers = ops.layers()
    if tuple(len(v) for v in f_layers) != schedule.slicing.stage_layers:
        raise ValueError(f"StageOps has layers {[len(v) for v in f_layers]} per stage but the schedule was sliced "
                         f"for {list(schedule.slicing.stage_layers)}")
    pre_f = [np.concatenate([[0.0], np.cumsum(v)]) for v in f_layers]
    pre_b = [np.concatenate([[0.0], np.cumsum(v)]) for v in bw_layers]
    ops_T, k_T = schedule.ops, schedule.column("virtual")
    lo_f, hi_f, lo_b, hi_b = (schedule.column(n) for n in ("f_lo", "f_hi", "b_lo", "b_hi"))
    for t, d in zip(*np.nonzero((ops_T == OP_F) | (ops_T == OP_BW) | (ops_T == OP_FB))):
        k, op, c = int(k_T[t, d]), int(ops_T[t, d]), 0.0
        if op in (OP_F, OP_FB):
            c += pre_f[k][hi_f[t, d]] - pre_f[k][lo_f[t, d]]
        if op in (OP_BW, OP_FB):
            c += pre_b[k][hi_b[t, d]] - pre_b[k][lo_b[t, d]]
        costs[t, d] = c
    return costs


@dataclass(frozen=True)
class Simulation:
    time: float  # sum over ticks of the slowest stage's op
    ticks: int
    busy: float  # sum of every stage's op costs (the work)
    schedule: Schedule

    @property
    def bubble_fraction(self) -> float:
        """Share of the stages' time not spent computing: 1 - work / (stages x time)."""
        total = self.schedule.stages * self.time
        return 0.0 if total <= 0 else 1.0 - self.busy / total


def schedule_for(ops: StageOps, microbatches: int, kind: str, virtual_stages: int | None = None,
                 max_in_flight: int | None = None, overlap: bool = False, slicing: Slicing | None = None) -> Schedule:
    """The table for per-virtual-stage costs ``ops`` (``ops.stages`` = devices x the kind's chunks per device);
    "1f1b_sliced" cut by ``slicing`` (None: ``best_slicing`` for these costs)."""
    V = virtual_stages_of(kind, virtual_stages)
    if ops.stages % V:
        raise ValueError(f"StageOps has {ops.stages} stages, not a multiple of the {V} chunks per device of {kind!r}")
    if kind == "1f1b_sliced" and slicing is None:
        slicing = best_slicing(ops, microbatches, overlap)
    return _cached_schedule(ops.stages // V, microbatches, ops.has_backward, ops.has_weight, kind, V, max_in_flight,
                            bool(overlap), slicing)


_CACHE: dict = {}


def _cached_schedule(stages, microbatches, has_backward, has_weight, kind, virtual_stages=None,
                     max_in_flight=None, overlap=False, slicing=None) -> Schedule:
    key = (stages, microbatches, has_backward, has_weight if kind in ("zb_h1", "zb_v") else None, kind,
           virtual_stages, max_in_flight, overlap, slicing)
    if key not in _CACHE:
        if len(_CACHE) > 4096:
            _CACHE.clear()
        _CACHE[key] = build_schedule(stages, microbatches, backward_stages=has_backward, weight_stages=has_weight,
                                     kind=kind, virtual_stages=virtual_stages, max_in_flight=max_in_flight,
                                     overlap=overlap, slicing=slicing)
    return _CACHE[key]


def _priced(sched: Schedule, ops: StageOps, overlap: bool, tick_seconds: float) -> "Simulation":
    c = tick_costs(sched, ops)
    per_tick = c.max(axis=1)
    per_tick = np.maximum(per_tick, tick_seconds) if overlap else per_tick + tick_seconds
    return Simulation(float(per_tick.sum()), int(c.shape[0]), float(c.sum()), sched)


def best_slicing(ops: StageOps, microbatches: int, overlap: bool = False, tick_seconds: float = 0.0) -> Slicing:
    """The slicing of ``ops``' layers (``units_from_costs``) whose "1f1b_sliced" table is fastest in simulation,
    over ``slicing_budgets`` (a tick's ppermutes, ``tick_seconds``, count against many small ticks)."""
    best, units = None, units_from_costs(ops, 1)
    for budget in slicing_budgets(units):
        sl = replace(units, budget=budget)
        sched = _cached_schedule(ops.stages, microbatches, ops.has_backward, ops.has_weight, "1f1b_sliced", 1, None,
                                 bool(overlap), sl)
        time = _priced(sched, ops, overlap, tick_seconds).time
        if best is None or time < best[0]:
            best = (time, sl)
    return best[1]


def simulate(ops: StageOps, microbatches: int, kind: str = "1f1b", virtual_stages: int | None = None,
             max_in_flight: int | None = None, overlap: bool = False, tick_seconds: float = 0.0,
             slicing: Slicing | None = None) -> Simulation:
    """The lockstep step time of ``kind`` with these per-(virtual-)stage op costs (the table the runtime would
    execute for a layout with these stages' backward / weight-gradient flags). ``tick_seconds``: what a tick's
    ppermutes take, in the unit of the costs: after the tick's ops (each tick lasts its slowest op + it), or with
    ``overlap`` beside the next tick's ops (each tick lasts the longer of the two). "1f1b_sliced": cut by ``slicing``
    (None: the fastest, ``best_slicing``; the table's ``slicing`` says which)."""
    if not tick_seconds >= 0:
        raise ValueError(f"tick_seconds must be >= 0; got {tick_seconds!r}")
    if kind == "1f1b_sliced" and slicing is None:
        slicing = best_slicing(ops, microbatches, overlap, tick_seconds)
    return _priced(schedule_for(ops, microbatches, kind, virtual_stages, max_in_flight, overlap, slicing), ops,
                   overlap, tick_seconds)
