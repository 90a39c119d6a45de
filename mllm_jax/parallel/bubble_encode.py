"""Frozen encoders' forwards in the pipeline's warm-up bubbles: which device prepares which microbatch's input in
which tick.

In every one-chunk schedule device d idles through the first ticks while the first microbatches reach it. Its
slots of the pipeline's inputs (``parallel.conveyor``: device d's slot j holds microbatch d x K + j until the slot
first moves down the ring) are then still its own. An encode op runs a frozen encoder (and its projector and the
injection) on one of those microbatches in such an idle tick and writes the finished input into the slot, which the
conveyor then carries to device 0 as it carries any input. The tick already lasts as long as its slowest stage's op;
an encode that fits inside that time costs nothing, and the microbatch's encoder forward leaves the serial work done
before the pipeline.

``plan_encodes`` places the encodes on a schedule's table: idle ticks only, a slot before its first move, ascending
slots (so each tick's encodes are a contiguous range ``[lo, hi)`` of the device's slots, a loop with a data trip
count in the runtime), as many per tick as fit in the tick's cost. ``check_plan`` is what the runtime asks before it
runs one (a plan made for another table is refused).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mllm_jax.parallel.conveyor import Conveyor, stage0_events
from mllm_jax.parallel.schedule import OP_IDLE, Schedule


@dataclass(frozen=True)
class EncodePlan:
    """``slots`` int32 [ticks, devices, 2]: the range [lo, hi) of the device's input slots it prepares at the start
    of that tick (lo == hi: none). ``microbatches``: the microbatches prepared inside the pipeline, ascending; the
    others' inputs are made before it."""

    slots: np.ndarray
    microbatches: tuple
    per_device: int

    @property
    def counts(self) -> np.ndarray:
        """[ticks, devices]: the encodes each device runs in each tick."""
        return self.slots[:, :, 1] - self.slots[:, :, 0]

    @property
    def ticks(self) -> int:
        return self.slots.shape[0]


def no_encodes(sched: Schedule, per_device: int) -> EncodePlan:
    return EncodePlan(np.zeros((sched.table.shape[0], sched.stages, 2), np.int32), (), per_device)


def slot_deadlines(sched: Schedule, conveyor: Conveyor, microbatches: int) -> np.ndarray:
    """int [devices, K]: the last tick in which device d may prepare its slot j (microbatch d K + j): the tick
    before the slot first moves (its message is made at the end of that tick), on device 0 the tick before the
    forward that reads it; -1 where the slot holds no microbatch."""
    S, K, M = conveyor.devices, conveyor.per_device, int(microbatches)
    f_ticks, _ = stage0_events(sched)
    out = np.full((S, K), -1, np.int64)
    for j in range(K):
        moves = np.flatnonzero(conveyor.sends[:, 0] == j)
        for d in range(S):
            m = d * K + j
            if m >= M:
                continue
            out[d, j] = f_ticks[m] - 1 if d == 0 else int(moves[0]) - 1 if moves.size else -1
    return out


def plan_encodes(sched: Schedule, conveyor: Conveyor, microbatches: int, *, encode_cost: float,
                 tick_cost) -> EncodePlan:
    """The encodes that fit in ``sched``'s idle ticks: device d, idle in tick t, prepares its next slots whose
    deadline (``slot_deadlines``) is at or after t, as many as fit in the tick, floor(``tick_cost[t]`` /
    ``encode_cost``) (``tick_cost``: [ticks] what each tick lasts, its slowest op; ``encode_cost``: one
    microbatch's encoder forward in the same unit, > 0). Slots whose deadline passes before a fitting idle tick are
    left to be made before the pipeline."""
    if not encode_cost > 0:
        raise ValueError(f"encode_cost must be > 0; got {encode_cost!r}")
    T, S, K = sched.table.shape[0], sched.stages, conveyor.per_device
    tick_cost = np.asarray(tick_cost, np.float64)
    if tick_cost.shape != (T,):
        raise ValueError(f"tick_cost must have one entry per tick ({T}); got shape {tick_cost.shape}")
    if sched.virtual_stages != 1:
        raise ValueError(f"encodes in the bubbles are planned for one-chunk schedules; got {sched.kind!r}")
    deadline = slot_deadlines(sched, conveyor, microbatches)
    slots = np.zeros((T, S, 2), np.int32)
    done = []
    for d in range(S):
        j = 0
        for t in range(T):
            while j < K and deadline[d, j] < t:  # too late for this slot (or no microbatch in it): made before
                j += 1
            if j >= K:
                break
            if sched.ops[t, d] != OP_IDLE:
                continue
            fit = int(np.floor(tick_cost[t] / encode_cost + 1e-9))
            hi = j
            while hi < K and hi - j < fit and deadline[d, hi] >= t:
                hi += 1
            if hi > j:
                slots[t, d] = (j, hi)
                done += [d * K + s for s in range(j, hi)]
                j = hi
    return EncodePlan(slots, tuple(sorted(done)), K)


def check_plan(plan: EncodePlan, sched: Schedule, conveyor: Conveyor, microbatches: int) -> None:
    """Refuse a plan the runtime cannot run on this table: wrong shape, an encode in a tick where the device runs
    an op, a slot prepared after its deadline or twice, ``microbatches`` not what the slots hold."""
    T, S, K = sched.table.shape[0], sched.stages, conveyor.per_device
    if plan.slots.shape != (T, S, 2) or plan.per_device != K:
        raise ValueError(f"the encode plan has slots {plan.slots.shape} over {plan.per_device} slots per device; the "
                         f"pipeline's table needs ({T}, {S}, 2) over {K}")
    lo, hi = plan.slots[:, :, 0], plan.slots[:, :, 1]
    if (lo < 0).any() or (hi < lo).any() or (hi > K).any():
        raise ValueError(f"the encode plan's slot ranges must satisfy 0 <= lo <= hi <= {K}")
    busy = (hi > lo) & (sched.ops != OP_IDLE)
    if busy.any():
        t, d = (int(v[0]) for v in np.nonzero(busy))
        raise ValueError(f"the encode plan encodes on device {d} in tick {t}, where it runs an op")
    deadline = slot_deadlines(sched, conveyor, microbatches)
    seen = set()
    for t, d in zip(*np.nonzero(hi > lo)):
        for j in range(lo[t, d], hi[t, d]):
            if (d, j) in seen or deadline[d, j] < t:
                raise ValueError(f"the encode plan prepares slot {j} of device {d} in tick {t}: "
                                 + ("twice" if (d, j) in seen else f"after its deadline (tick {deadline[d, j]})"))
            seen.add((d, j))
    made = tuple(sorted(d * K + j for d, j in seen))
    if made != tuple(plan.microbatches):
        raise ValueError(f"the encode plan's microbatches {list(plan.microbatches)} are not those its slots prepare "
                         f"({list(made)})")
