"""The pipeline's microbatch inputs and input gradients, stored over `pipeline` and carried on a ring.

Only virtual stage 0 (device 0 under every schedule) reads a microbatch's input (its embeddings, [mb, S, D]) and
writes its input gradient. Replicated, every device would hold all M of both for the whole step. Here each device
holds ``per_device`` = max(2, ceil(M / devices)) slots of each: device d's slot j starts as microbatch d x
per_device + j (zeros past M), and the microbatches reach device 0 on a ring, every device sending one slot to
d - 1 (mod devices) in the same tick:

- inputs: after device 0 forwards microbatch m, slot m mod per_device moves one device down the ring, which brings
  microbatch m + per_device to device 0 (r moves of slot j put microbatch r x per_device + j there);
- input gradients: device 0 writes microbatch m's into slot m mod per_device; after each write the slot moves once,
  and after the loop each slot moves until it has moved ``devices`` times in all, which leaves microbatch
  r x per_device + j's gradient on device r: the inputs' layout.

A move requested by tick t's op is sent at the start of tick t + 1 and stored after that tick's op, so the
``ppermute`` runs beside the op (nothing in the tick reads it). That is why a device has at least two slots: the
slot a tick's op uses is never the one moving in that tick. The moves are data (this plan, from the schedule's
table), the same for every device, so the runtime sends one message per tick (both buffers' moving slots, or zeros)
over the one ring.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mllm_jax.parallel.schedule import OP_B, OP_BW, OP_F, OP_FB, Schedule


@dataclass(frozen=True)
class Conveyor:
    """per_device: slots per device. sends int32 [ticks, 2]: the input slot and the input-gradient slot every device
    sends to d - 1 at the start of each tick (-1: none). tail: bool [rounds, per_device], the input-gradient slots
    moved once more in each round after the loop."""

    devices: int
    per_device: int
    sends: np.ndarray
    tail: np.ndarray

    def owner(self, m: int) -> tuple:
        """(device, slot) holding microbatch m's input before the step and its input gradient after it."""
        return divmod(int(m), self.per_device)


def slots_per_device(microbatches: int, devices: int) -> int:
    """K = max(2, ceil(M / devices)): the slots of inputs (and of input gradients) each device holds."""
    return max(2, -(-int(microbatches) // int(devices)))


def stage0_events(sched: Schedule) -> tuple:
    """The ticks where virtual stage 0 reads a microbatch's input (its forward, or the forward's first slice) and
    writes its input gradient (its backward, or the backward's last slice): ({microbatch: tick}, {microbatch:
    tick})."""
    ops, virtual = sched.ops, sched.column("virtual")
    mb, mb2 = sched.column("mb"), sched.column("mb2")
    reads, writes = sched.column("f_lo") <= 0, sched.column("b_lo") <= 0
    f_ticks, b_ticks = {}, {}
    for t, d in zip(*np.nonzero(virtual == 0)):
        if d != 0:
            raise ValueError(f"virtual stage 0 runs on device {d} at tick {t}; the conveyor feeds device 0")
        op = ops[t, d]
        if op in (OP_F, OP_FB) and reads[t, d]:
            f_ticks[int(mb[t, d])] = int(t)
        if op in (OP_B, OP_BW) and writes[t, d]:
            b_ticks[int(mb[t, d])] = int(t)
        if op == OP_FB and writes[t, d]:
            b_ticks[int(mb2[t, d])] = int(t)
    return f_ticks, b_ticks


def plan_conveyor(sched: Schedule, microbatches: int, *, input_grads: bool) -> Conveyor:
    """The moves of the inputs' and (with ``input_grads``) the input gradients' slots for ``sched``'s table."""
    S, M, T = sched.stages, int(microbatches), sched.table.shape[0]
    K = slots_per_device(M, S)
    f_ticks, b_ticks = stage0_events(sched)
    if sorted(f_ticks) != list(range(M)):
        raise ValueError(f"the schedule forwards microbatches {sorted(f_ticks)} on virtual stage 0; expected "
                         f"0..{M - 1}")
    if input_grads and sorted(b_ticks) != list(range(M)):
        raise ValueError(f"the schedule backwards microbatches {sorted(b_ticks)} on virtual stage 0; expected "
                         f"0..{M - 1}")
    sends = np.full((T, 2), -1, np.int32)
    # Inputs: slot m mod K moves after microbatch m's forward, before microbatch m + K's.
    for m in range(M - K):
        t = f_ticks[m] + 1
        if not t < f_ticks[m + K]:
            raise ValueError(f"microbatch {m + K} is forwarded at tick {f_ticks[m + K]}, before its input arrives "
                             f"(tick {t})")
        _send(sends, t, 0, m % K)
    moves = np.zeros(K, np.int64)  # input-gradient moves of each slot so far
    if input_grads:
        for m in range(M):
            t = b_ticks[m] + 1
            nxt = b_ticks.get(m + K)
            if nxt is not None and not t < nxt:
                raise ValueError(f"microbatch {m + K}'s input gradient is written at tick {nxt}, before microbatch "
                                 f"{m}'s has left its slot (tick {t})")
            if t < T:
                _send(sends, t, 1, m % K)
                moves[m % K] += 1
    # After the loop: every input-gradient slot moves until it has moved S times (microbatch r K + j's gradient,
    # written on device 0 and moved S - r times down the ring, is then on device r).
    # Slots never written hold zeros and stay.
    written = np.bincount(np.arange(M) % K, minlength=K) > 0
    left = np.where(input_grads & written, S - moves, 0)
    tail = np.arange(int(left.max(initial=0)))[:, None] < left[None, :]
    return Conveyor(S, K, sends, tail)


def _send(sends: np.ndarray, t: int, buffer: int, slot: int):
    """One slot of each buffer moves per tick: the message has room for one."""
    if sends[t, buffer] >= 0:
        raise ValueError(f"two moves of {('input', 'input-gradient')[buffer]} slots in tick {t} (slots "
                         f"{sends[t, buffer]} and {slot}): virtual stage 0 runs two such ops in one tick")
    sends[t, buffer] = slot


def pad_microbatches(x_M, conveyor: Conveyor, xp=np):
    """[M, ...] -> [devices x per_device, ...]: zeros past M, so device d's block is its slots (an input that already
    has devices x per_device rows is returned as it is)."""
    pad = conveyor.devices * conveyor.per_device - x_M.shape[0]
    if pad < 0:
        raise ValueError(f"{x_M.shape[0]} microbatch rows is more than the conveyor's {conveyor.devices} devices x "
                         f"{conveyor.per_device} slots")
    return xp.pad(x_M, [(0, pad)] + [(0, 0)] * (x_M.ndim - 1)) if pad else x_M
