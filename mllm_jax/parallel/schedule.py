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
- "gpipe": all forwards, then all backwards (every microbatch in flight; a memory reference).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

OP_IDLE, OP_F, OP_B, OP_W, OP_BW, OP_SKIP, OP_FB = range(7)
OP_CHARS = ".FBWXsP"  # for printing tables: X = fused backward, P = a forward and a fused backward paired in a tick
SCHEDULES = ("1f1b", "zb_h1", "1f1b_fb", "gpipe")
# Columns of the table. x_slot: the slot of saved layer inputs the op reads (and F on stage 0 writes); g_slot: the
# arrived cotangent B / BW reads; w_slot: the slot of kept layer-output cotangents B writes and W reads;
# recv_*: where this tick's arriving activation / cotangent is stored (-1: nothing arrives). x and w slots share one
# pool per stage (both hold one row per layer), so a deferred W costs no buffer 1F1B would not have.
# mb2 / x2_slot: the backward half of a paired op (OP_FB; its cotangent is in g_slot).
FIELDS = ("op", "mb", "x_slot", "g_slot", "recv_x_slot", "recv_g_slot", "w_slot", "mb2", "x2_slot")


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

    def column(self, field: str) -> np.ndarray:
        return self.table[:, :, FIELDS.index(field)]

    @property
    def ops(self) -> np.ndarray:
        return self.column("op")

    @property
    def stages(self) -> int:
        return self.table.shape[1]

    def format(self) -> str:
        """One line per tick: the op letter and microbatch of every stage."""
        ops, mbs = self.ops, self.column("mb")
        return "\n".join(
            f"{t:3d} " + " ".join(OP_CHARS[o] + (str(m) if m >= 0 else " ") for o, m in zip(ops[t], mbs[t]))
            for t in range(ops.shape[0])
        )


def stage_op_order(stages: int, microbatches: int, kind: str = "1f1b") -> list:
    """Per stage, the ordered list of (op, microbatch) with the backward as OP_BW (zb_h1 splits some of them when
    it places them). 1F1B / ZB-H1: min(stages - s - 1, M) warm-up forwards, then one forward and one backward
    alternately, then the remaining backwards. GPipe: all forwards, then all backwards."""
    if kind not in SCHEDULES:
        raise ValueError(f"schedule kind must be one of {SCHEDULES}; got {kind!r}")
    orders = []
    for s in range(stages):
        if kind == "gpipe":
            orders.append([(OP_F, m) for m in range(microbatches)] + [(OP_BW, m) for m in range(microbatches)])
            continue
        warm = min(stages - s - 1, microbatches)
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


def _place(stages, M, bw, ws, kind):
    """Assign every stage's ops to ticks (list of rows of (op, m)). An op runs at the first tick its dependency
    finished before (F: the previous stage's F of the microbatch; a backward: the next stage's backward, or on the
    last stage its own F); zb_h1 fills a stage's otherwise idle ticks with its deferred Ws."""
    orders = stage_op_order(stages, M, kind)
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
                ready = s == 0 or 0 <= done_f[s - 1, m] < t
            elif op == OP_BW:
                ready = (0 <= done_f[s, m] < t) if s == stages - 1 else (0 <= done_b[s + 1, m] < t)
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


def _place_paired(stages, M, bw):
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
                ready = s == 0 or 0 <= done_f[s - 1, f_m] < t
                room = (s == stages - 1 or live[s + 1] < cap) and (s > 0 or not bw[0] or live[0] < cap)
                f_m = f_m if ready and room else None
            b_m = nb[s] if bw[s] and nb[s] < M else None
            if b_m is not None:
                if s == stages - 1:
                    ready = 0 <= done_f[s, b_m] < t or f_m == b_m
                else:
                    ready = 0 <= done_b[s + 1, b_m] < t
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


def build_schedule(stages: int, microbatches: int, *, backward_stages=None, weight_stages=None,
                   kind: str = "1f1b") -> Schedule:
    """The table the runtime executes. ``backward_stages[s]`` False: stage s has no backward (a frozen prefix; its
    backwards stay in the table as OP_SKIP to keep the pace, so nothing piles up downstream, and send nothing).
    ``weight_stages[s]`` False: stage s has no weight gradient (only frozen layers), so zb_h1 never splits its
    backward. Buffer slots: a stage's saved inputs of a microbatch occupy an activation slot from their arrival (F on
    stage 0) until BW or W, kept cotangents one from B until W; an arrived cotangent a g slot until B / BW reads it."""
    if stages < 1 or microbatches < 1:
        raise ValueError(f"stages and microbatches must be >= 1; got {stages} and {microbatches}")
    bw = np.ones(stages, bool) if backward_stages is None else np.asarray(backward_stages, bool)
    ws = bw.copy() if weight_stages is None else np.asarray(weight_stages, bool) & bw
    for name, v in (("backward_stages", bw), ("weight_stages", ws)):
        if v.shape != (stages,):
            raise ValueError(f"{name} must have {stages} entries; got shape {v.shape}")
    rows = _place_paired(stages, microbatches, bw) if kind == "1f1b_fb" else _place(stages, microbatches, bw, ws, kind)

    T = len(rows)
    table = np.full((T, stages, len(FIELDS)), -1, np.int32)
    col = {f: i for i, f in enumerate(FIELDS)}
    x_of = [dict() for _ in range(stages)]  # microbatch -> activation slot of its saved inputs
    w_of = [dict() for _ in range(stages)]  # microbatch -> activation slot of its kept cotangents
    g_of = [dict() for _ in range(stages)]
    a_free, g_free = [set() for _ in range(stages)], [set() for _ in range(stages)]
    a_count, g_count = [0] * stages, [0] * stages
    live, peak = [0] * stages, [0] * stages

    def alloc(free, count, s):
        if free[s]:
            slot = min(free[s])
            free[s].remove(slot)
            return slot
        count[s] += 1
        return count[s] - 1

    def take(s):
        live[s] += 1
        peak[s] = max(peak[s], live[s])
        return alloc(a_free, a_count, s)

    def release(s, slot):
        live[s] -= 1
        a_free[s].add(slot)

    for t, row in enumerate(rows):
        for s, (op, m, *rest) in enumerate(row):
            table[t, s, col["op"]], table[t, s, col["mb"]] = op, m
            if op in (OP_F, OP_FB):
                if s == 0 and bw[s]:  # stage 0 reads the input directly; keep it for its backward
                    x_of[s][m] = take(s)
                if m in x_of[s]:
                    table[t, s, col["x_slot"]] = x_of[s][m]
                    if not bw[s]:  # no backward: the slot is free once the forward has read it
                        release(s, x_of[s].pop(m))
            if op == OP_FB:  # the backward half: after the forward half has taken its slot (it runs first)
                m2 = rest[0]
                table[t, s, col["mb2"]] = m2
                table[t, s, col["x2_slot"]] = x_of[s][m2]
                if s < stages - 1:
                    table[t, s, col["g_slot"]] = g_of[s][m2]
                    g_free[s].add(g_of[s].pop(m2))
                release(s, x_of[s].pop(m2))
            elif op in (OP_B, OP_BW):
                table[t, s, col["x_slot"]] = x_of[s][m]
                if s < stages - 1:
                    table[t, s, col["g_slot"]] = g_of[s][m]
                    g_free[s].add(g_of[s].pop(m))
                if op == OP_BW:
                    release(s, x_of[s].pop(m))
                else:
                    w_of[s][m] = take(s)
                    table[t, s, col["w_slot"]] = w_of[s][m]
            elif op == OP_W:
                table[t, s, col["x_slot"]] = x_of[s][m]
                table[t, s, col["w_slot"]] = w_of[s][m]
                release(s, x_of[s].pop(m))
                release(s, w_of[s].pop(m))
        # Messages sent this tick arrive at its end, after every op of the tick has read its buffers.
        for s, (op, m, *rest) in enumerate(row):
            if op in (OP_F, OP_FB) and s + 1 < stages:
                x_of[s + 1][m] = take(s + 1)
                table[t, s + 1, col["recv_x_slot"]] = x_of[s + 1][m]
            mb_back = rest[0] if op == OP_FB else m
            if op in (OP_B, OP_BW, OP_FB) and s > 0 and bw[s - 1]:
                g_of[s - 1][mb_back] = alloc(g_free, g_count, s - 1)
                table[t, s - 1, col["recv_g_slot"]] = g_of[s - 1][mb_back]
    return Schedule(table, max(1, max(a_count)), max(1, max(g_count)), tuple(peak), kind)


# ----------------------------------------------------------------------------------------------------------------
# The simulator: the lockstep runtime's step time from per-stage op costs.


@dataclass(frozen=True)
class StageOps:
    """Per-stage cost of one op on one microbatch: forward, input-gradient backward, weight-gradient backward, and
    the fused backward (what BW costs; with per-layer remat it is not b + w: B and W each recompute)."""

    f: tuple
    b: tuple
    w: tuple
    bw: tuple

    def __post_init__(self):
        n = len(self.f)
        if n < 1 or any(len(v) != n for v in (self.b, self.w, self.bw)):
            raise ValueError(f"StageOps needs equal-length per-stage costs; got {len(self.f)}, {len(self.b)}, "
                             f"{len(self.w)}, {len(self.bw)}")

    @property
    def stages(self) -> int:
        return len(self.f)

    @property
    def has_backward(self) -> tuple:
        return tuple(bool(b > 0 or w > 0 or x > 0) for b, w, x in zip(self.b, self.w, self.bw))

    @property
    def has_weight(self) -> tuple:
        return tuple(bool(w > 0) for w in self.w)


def tick_costs(schedule: Schedule, ops: StageOps) -> np.ndarray:
    """[ticks, stages]: what each stage's op of each tick costs."""
    if ops.stages != schedule.stages:
        raise ValueError(f"StageOps has {ops.stages} stages but the schedule has {schedule.stages}")
    by_op = np.zeros((len(OP_CHARS), ops.stages))
    by_op[OP_F], by_op[OP_B], by_op[OP_W], by_op[OP_BW] = ops.f, ops.b, ops.w, ops.bw
    by_op[OP_FB] = np.asarray(ops.f) + np.asarray(ops.bw)
    return np.take_along_axis(by_op, schedule.ops.astype(np.int64), axis=0)


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


def schedule_for(ops: StageOps, microbatches: int, kind: str) -> Schedule:
    return _cached_schedule(ops.stages, microbatches, ops.has_backward, ops.has_weight, kind)


_CACHE: dict = {}


def _cached_schedule(stages, microbatches, has_backward, has_weight, kind) -> Schedule:
    key = (stages, microbatches, has_backward, has_weight if kind == "zb_h1" else None, kind)
    if key not in _CACHE:
        if len(_CACHE) > 4096:
            _CACHE.clear()
        _CACHE[key] = build_schedule(stages, microbatches, backward_stages=has_backward, weight_stages=has_weight,
                                     kind=kind)
    return _CACHE[key]


def simulate(ops: StageOps, microbatches: int, kind: str = "1f1b") -> Simulation:
    """The lockstep step time of ``kind`` with these per-stage op costs (the table the runtime would execute for a
    layout with these stages' backward / weight-gradient flags)."""
    sched = schedule_for(ops, microbatches, kind)
    c = tick_costs(sched, ops)
    return Simulation(float(c.max(axis=1).sum()), int(c.shape[0]), float(c.sum()), sched)
