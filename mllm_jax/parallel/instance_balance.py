"""Encoder instances (images, video chunks, audio clips) -> devices by cost: LPT, then refinement.

Plain costs in, a device per instance out; knows no model (the data side prices instances from the encoder's config,
``mllm_jax.data.encoder_balance.instance_cost``). The same greedy-then-refine shape as the context planner
(``mllm_jax.parallel.context``), on independent items instead of row blocks:

1. LPT (longest processing time first): instances by descending cost, each to the least-loaded device that still has
   room (ties to the lowest device index, so every host computes the same plan). Graham's bounds hold without a
   count cap: makespan <= (4/3 - 1/(3m)) * OPT, and (any list schedule) <= total/m + (1 - 1/m) * max cost.
2. Refinement: while some move of one instance, or swap of two, between the busiest device and another lowers the
   busiest device's load without raising the other's above it, do the one that best halves their gap. Each step
   strictly lowers the busiest load or the number of devices at it, so it only ever improves on LPT.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class InstancePlan:
    """device: int32 [n] the device (shard of the instance axis) of each instance; slot: int32 [n] its position within
    that device's slice (in assignment order); loads: float64 [m] summed cost per device; counts: int32 [m]."""

    device: np.ndarray
    slot: np.ndarray
    loads: np.ndarray
    counts: np.ndarray

    def max_over_mean(self) -> float:
        """Busiest device's load / mean load (1.0 is perfect; 1.0 for no work at all)."""
        mean = float(self.loads.mean()) if len(self.loads) else 0.0
        return float(self.loads.max()) / mean if mean > 0 else 1.0


def lower_bound(costs, num_devices: int) -> float:
    """No assignment's busiest device does less than this: max(mean load, largest instance)."""
    costs = np.asarray(costs, np.float64)
    return max(float(costs.sum()) / num_devices, float(costs.max(initial=0.0)))


def assign(costs, num_devices: int, *, max_count: int | None = None, refine_steps: int | None = None) -> InstancePlan:
    """Balanced assignment of instances of cost ``costs`` [n] to ``num_devices`` devices (see the module docstring).

    ``max_count``: at most this many instances per device (the static per-device slice), None for no cap.
    ``refine_steps``: cap on refinement steps (None: 4 * n + num_devices, far more than it ever takes)."""
    costs = np.asarray(costs, np.float64).reshape(-1)
    n, m = len(costs), int(num_devices)
    if m < 1:
        raise ValueError(f"num_devices must be >= 1; got {num_devices}")
    if (costs < 0).any() or not np.isfinite(costs).all():
        raise ValueError(f"instance costs must be finite and >= 0; got min {costs.min()}")
    if max_count is not None and max_count * m < n:
        raise ValueError(f"max_count={max_count} per device x {m} devices holds fewer than the {n} instances")
    cap = n if max_count is None else int(max_count)
    device = np.zeros(n, np.int32)
    loads = np.zeros(m, np.float64)
    counts = np.zeros(m, np.int64)
    heap = [(0.0, d) for d in range(m)]  # (load, device): least-loaded first, ties to the lowest index
    full: list = []
    for i in np.argsort(-costs, kind="stable"):
        load, d = heapq.heappop(heap)
        while counts[d] >= cap:  # full devices leave the heap for good
            full.append(d)
            load, d = heapq.heappop(heap)
        device[i] = d
        loads[d] = load + costs[i]
        counts[d] += 1
        heapq.heappush(heap, (loads[d], d))
    _refine(costs, device, loads, counts, cap, 4 * n + m if refine_steps is None else refine_steps)
    slot = np.zeros(n, np.int32)
    seen = np.zeros(m, np.int64)
    for i in range(n):  # slots in instance order within each device: deterministic, stable
        slot[i] = seen[device[i]]
        seen[device[i]] += 1
    return InstancePlan(device, slot, loads, counts.astype(np.int32))


def _refine(costs, device, loads, counts, cap: int, steps: int) -> None:
    """Moves and swaps off the busiest device, in place (module docstring, step 2)."""
    for _ in range(steps):
        hi = int(np.argmax(loads))
        mine = np.flatnonzero(device == hi)
        if len(mine) == 0:
            return
        improved = False
        for lo in np.argsort(loads, kind="stable"):
            lo = int(lo)
            gap = loads[hi] - loads[lo]
            if lo == hi or gap <= 0:
                break  # every later device is at least as loaded
            # Moving cost c (or swapping c for c' with delta c - c') helps iff 0 < delta < gap; best near gap / 2.
            best, best_score = None, None
            if counts[lo] < cap:
                c = costs[mine]
                ok = (c > 0) & (c < gap)
                if ok.any():
                    k = int(np.argmin(np.where(ok, np.abs(gap / 2 - c), np.inf)))
                    best, best_score = ("move", mine[k], -1), abs(gap / 2 - c[k])
            theirs = np.flatnonzero(device == lo)
            if len(theirs):
                delta = costs[mine][:, None] - costs[theirs][None, :]
                ok = (delta > 0) & (delta < gap)
                if ok.any():
                    score = np.where(ok, np.abs(gap / 2 - delta), np.inf)
                    a, b = np.unravel_index(int(np.argmin(score)), score.shape)
                    if best_score is None or score[a, b] < best_score:
                        best = ("swap", mine[a], theirs[b])
            if best is None:
                continue
            kind, i, j = best
            device[i] = lo
            loads[hi] -= costs[i]
            loads[lo] += costs[i]
            if kind == "swap":
                device[j] = hi
                loads[hi] += costs[j]
                loads[lo] -= costs[j]
            else:
                counts[hi] -= 1
                counts[lo] += 1
            improved = True
            break
        if not improved:
            return
