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


# ----------------------------------------------------------------------------------------------------------------
# Several processes: the same plan, instances kept where they already are, and the pixels moved on device.


def localize(plan: InstancePlan, costs, source) -> InstancePlan:
    """``plan`` with as many instances as possible left on their ``source`` device (where the row-bound layout holds
    them), its loads unchanged as a multiset (so its busiest / mean is ``plan``'s):

    1. whole device loads are relabelled: the busiest planned device to the device with the most own work, and so on;
    2. within each class of equal cost (swapping two equal-cost instances leaves every load as it is), each device
       keeps its count of the class, filled with its own instances first; the surplus of over-full sources fills the
       other devices' room, each one to the device with room that holds the fewest from that source yet (so the
       static per-pair buffer of ``exchange_indices`` stays small).

    The instances that move are then the fewest any assignment with these per-device counts can move."""
    costs = np.asarray(costs, np.float64).reshape(-1)
    source = np.asarray(source, np.int64).reshape(-1)
    m = len(plan.loads)
    if source.shape != costs.shape or (len(source) and (source.min() < 0 or source.max() >= m)):
        raise ValueError(f"source must give a device in [0, {m}) for each of the {len(costs)} instances; got "
                         f"{source.shape} values in [{source.min(initial=0)}, {source.max(initial=0)}]")
    own = np.bincount(source, weights=costs, minlength=m)
    relabel = np.empty(m, np.int64)
    relabel[np.argsort(-plan.loads, kind="stable")] = np.argsort(-own, kind="stable")
    planned = relabel[plan.device]
    device = np.full(len(costs), -1, np.int64)
    pair = np.zeros((m, m), np.int64)  # instances moved src -> dst
    for value in np.unique(costs):
        idx = np.flatnonzero(costs == value)
        room = np.bincount(planned[idx], minlength=m)
        surplus = []
        for d in range(m):
            mine = idx[source[idx] == d]
            keep = min(len(mine), int(room[d]))
            device[mine[:keep]] = d
            room[d] -= keep
            surplus.extend(mine[keep:])
        for i in surplus:  # ascending source: each goes where it adds least to a pair's count, then most room
            s = source[i]
            open_ = np.flatnonzero(room > 0)
            d = int(open_[np.lexsort((-room[open_], pair[s, open_]))[0]])
            device[i] = d
            room[d] -= 1
            pair[s, d] += 1
    slot = np.zeros(len(costs), np.int32)
    seen = np.zeros(m, np.int64)
    for i in range(len(costs)):
        slot[i] = seen[device[i]]
        seen[device[i]] += 1
    return InstancePlan(device.astype(np.int32), slot, np.bincount(device, weights=costs, minlength=m),
                        np.bincount(device, minlength=m).astype(np.int32))


def pair_count(plan: InstancePlan, source) -> int:
    """The most instances any one device sends to any one other device under ``plan`` (0: nothing moves)."""
    source = np.asarray(source, np.int64).reshape(-1)
    moved = source != plan.device
    if not moved.any():
        return 0
    m = len(plan.loads)
    return int(np.bincount(source[moved] * m + plan.device[moved], minlength=m * m).max())


def exchange_indices(plans, rows, rows_per_device: int, capacity: int, pair_capacity: int):
    """Static index arrays that make the planned layout out of the row-bound one (``move_rows``).

    ``plans[m]``: the InstancePlan of microbatch m over ``rows[m]`` (the instances' rows in the row-bound instance
    axis, ``rows_per_device`` per device, so row r is on device r // rows_per_device). Returns (send [M, S, S, K],
    recv [M, S, C]): send[m, a, b, j] is the row (local to a) that device a sends to b in the j-th place, -1 for
    none; recv[m, b, i] is where device b's i-th planned instance is in the pool it holds after the exchange (its own
    ``rows_per_device`` rows, then K rows from each device in order), -1 for an empty slot."""
    S = len(plans[0].loads) if plans else 1
    M, n, K, C = len(plans), rows_per_device, pair_capacity, capacity
    send = np.full((M, S, S, max(K, 1)), -1, np.int32)
    recv = np.full((M, S, C), -1, np.int32)
    for m, (plan, r) in enumerate(zip(plans, rows)):
        r = np.asarray(r, np.int64)
        src, dst = r // n, plan.device.astype(np.int64)
        if plan.counts.max(initial=0) > C:
            raise ValueError(f"microbatch {m}: a device holds {plan.counts.max()} instances, capacity is {C}")
        filled = np.zeros((S, S), np.int64)
        for i in range(len(r)):
            if src[i] == dst[i]:
                recv[m, dst[i], plan.slot[i]] = r[i] - src[i] * n
                continue
            j = filled[src[i], dst[i]]
            if j >= K:
                raise ValueError(f"microbatch {m}: device {src[i]} sends more than pair_capacity={K} instances to "
                                 f"device {dst[i]}")
            filled[src[i], dst[i]] += 1
            send[m, src[i], dst[i], j] = r[i] - src[i] * n
            recv[m, dst[i], plan.slot[i]] = n + src[i] * K + j
    return send[..., :K], recv


def _take(x_MN, idx_MR):
    """x[m, idx[m, r]] for idx >= 0, zeros for -1: [M, R, ...]."""
    import jax
    import jax.numpy as jnp

    got = jax.vmap(lambda a, i: a[i])(x_MN, jnp.maximum(idx_MR, 0))
    keep = (idx_MR >= 0).reshape(idx_MR.shape + (1,) * (x_MN.ndim - 2))
    return jnp.where(keep, got, jnp.zeros((), x_MN.dtype))


def move_rows(x_MN, send_MSSK, recv_MSC, mesh, axes: tuple):
    """The planned layout [M, S * C, ...] from the row-bound one [M, S * n, ...] (both split over ``axes``, the
    S devices of the encoder's instance axis, first axis major), on device: each device gathers what it sends into
    [S, K] slots, one ``all_to_all`` over ``axes`` delivers them, and each device picks its C instances from its own
    rows and what it received. Every device sends and receives (S - 1) x K rows (its own block stays); with K = 0
    (nothing moves) there is no collective. ``send``/``recv``: global int32 arrays split over ``axes`` on axis 1."""
    return _mover(mesh, tuple(axes))(x_MN, send_MSSK, recv_MSC)


_MOVERS: dict = {}


def _mover(mesh, axes: tuple):
    if (mesh, axes) not in _MOVERS:
        import jax
        import jax.numpy as jnp
        from jax.sharding import PartitionSpec as P

        def per_device(x, send, recv):  # x [M, n, ...], send [M, 1, S, K], recv [M, 1, C]
            M, _, S, K = send.shape
            pool = x
            if K:
                out = _take(x, send.reshape(M, S * K))
                got = jax.lax.all_to_all(out, axes, 1, 1, tiled=True)  # block s of axis 1: from device s
                pool = jnp.concatenate([x, got], axis=1)
            return _take(pool, recv[:, 0])

        spec = P(None, axes)
        _MOVERS[(mesh, axes)] = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(spec, spec, spec),
                                                      out_specs=spec, check_vma=False))
    return _MOVERS[(mesh, axes)]
