"""Assigning the samples of a global batch to data-parallel ranks and microbatches (Entrain-style balancing).

Each sample has a workload vector (encoder work, LLM work). ``assign(..., method="balanced")`` is hierarchical:
first ranks, then each rank's samples to its microbatches. Each level is a vector longest-processing-time greedy
(samples by decreasing normalised size, each to the feasible bin whose resulting max over objectives of
load / mean load is smallest) followed by a refinement pass of moves and swaps between the most loaded bin and the
others while they lower the pair's peak. Capacity limits (tokens and encoder instances per microbatch, and an exact
``fits`` test such as "packs into R rows of S tokens") are respected at every step.

"sequential" (samples in order, equal counts) and "random" (shuffled, equal counts) are the baselines; they are
repaired only where a microbatch would exceed its capacity.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

METHODS = ("balanced", "sequential", "random")


@dataclass
class Capacity:
    """Per-microbatch limits. tokens [n], instances [n, k] (per modality); fits(list of sample indices) -> bool is
    the exact test (None: the aggregate limits suffice)."""

    tokens: np.ndarray
    instances: np.ndarray
    max_tokens: float = np.inf
    max_instances: np.ndarray | float = np.inf
    fits: Callable | None = None

    def __post_init__(self):
        self.tokens = np.asarray(self.tokens, np.float64).reshape(-1)
        self.instances = np.asarray(self.instances, np.float64).reshape(len(self.tokens), -1)
        self.max_instances = np.broadcast_to(np.asarray(self.max_instances, np.float64), self.instances.shape[1:])

    @classmethod
    def unlimited(cls, n: int) -> "Capacity":
        return cls(np.zeros(n), np.zeros((n, 1)))


class _Bins:
    """Loads of a set of bins with an aggregate capacity scale (microbatches per bin)."""

    def __init__(self, n_bins, work, cap: Capacity, scale: int, exact: bool):
        self.items = [[] for _ in range(n_bins)]
        self.work = work
        self.load = np.zeros((n_bins, work.shape[1]))
        self.tok = np.zeros(n_bins)
        self.inst = np.zeros((n_bins, cap.instances.shape[1]))
        self.cap, self.scale, self.exact = cap, scale, exact
        # Normalise each objective by its mean load per bin; an objective with no work is ignored.
        total = work.sum(axis=0)
        self.norm = np.where(total > 0, n_bins / np.where(total > 0, total, 1.0), 0.0)

    def scores(self, load):
        return (load * self.norm).max(axis=-1)

    def aggregate_ok(self, tok, inst):
        return (tok <= self.cap.max_tokens * self.scale) & np.all(inst <= self.cap.max_instances * self.scale, axis=-1)

    def exact_ok(self, items) -> bool:
        return (not self.exact) or self.cap.fits is None or bool(self.cap.fits(items))

    def add(self, b, i):
        self.items[b].append(i)
        self.load[b] += self.work[i]
        self.tok[b] += self.cap.tokens[i]
        self.inst[b] += self.cap.instances[i]

    def remove(self, b, i):
        self.items[b].remove(i)
        self.load[b] -= self.work[i]
        self.tok[b] -= self.cap.tokens[i]
        self.inst[b] -= self.cap.instances[i]


def _greedy(bins: _Bins, order) -> list:
    """Places items of ``order`` (largest first); returns those no bin can take."""
    left = []
    for i in order:
        w = bins.work[i]
        new = bins.load + w
        key_peak = bins.scores(new)
        key_sum = (new * bins.norm).sum(axis=-1)
        ok = bins.aggregate_ok(bins.tok + bins.cap.tokens[i], bins.inst + bins.cap.instances[i])
        for b in np.lexsort((np.arange(len(key_peak)), key_sum, key_peak)):
            if ok[b] and bins.exact_ok(bins.items[b] + [i]):
                bins.add(b, i)
                break
        else:
            left.append(i)
    return left


def _refine(bins: _Bins, iterations: int) -> None:
    """Moves/swaps between the peak bin and the others while they strictly lower the pair's peak score."""
    for _ in range(iterations):
        s = bins.scores(bins.load)
        hi = int(np.argmax(s))
        improved = False
        for lo in np.argsort(s, kind="stable"):
            lo = int(lo)
            if lo == hi or s[lo] >= s[hi]:
                continue
            a = np.asarray(bins.items[hi], int)
            if len(a) == 0:
                break
            bl = np.asarray(bins.items[lo], int)
            wa = bins.work[a]
            # Candidates: move a_i (column 'none' = -1) or swap a_i with b_j.
            wb = np.vstack([np.zeros((1, bins.work.shape[1])), bins.work[bl].reshape(-1, bins.work.shape[1])])
            delta = wa[:, None, :] - wb[None, :, :]  # what leaves hi (and enters lo)
            peak = np.maximum(bins.scores(bins.load[hi] - delta), bins.scores(bins.load[lo] + delta))
            for flat in np.argsort(peak, axis=None, kind="stable"):
                if peak.flat[flat] >= s[hi] - 1e-12 * max(1.0, s[hi]):
                    break
                ia, jb = np.unravel_index(flat, peak.shape)
                i = int(a[ia])
                j = int(bl[jb - 1]) if jb > 0 else None
                d_tok = bins.cap.tokens[i] - (bins.cap.tokens[j] if j is not None else 0.0)
                d_inst = bins.cap.instances[i] - (bins.cap.instances[j] if j is not None else 0.0)
                if not (bins.aggregate_ok(bins.tok[hi] - d_tok, bins.inst[hi] - d_inst)
                        and bins.aggregate_ok(bins.tok[lo] + d_tok, bins.inst[lo] + d_inst)):
                    continue
                new_hi = [x for x in bins.items[hi] if x != i] + ([j] if j is not None else [])
                new_lo = [x for x in bins.items[lo] if x != j] + [i]
                if not (bins.exact_ok(new_hi) and bins.exact_ok(new_lo)):
                    continue
                bins.remove(hi, i)
                if j is not None:
                    bins.remove(lo, j)
                    bins.add(hi, j)
                bins.add(lo, i)
                improved = True
                break
            if improved:
                break
        if not improved:
            return


def _lpt_order(work: np.ndarray, idx) -> list:
    total = work[idx].sum(axis=0)
    norm = np.where(total > 0, 1.0 / np.where(total > 0, total, 1.0), 0.0)
    size = (work[idx] * norm).sum(axis=-1)
    return [idx[k] for k in np.lexsort((np.asarray(idx), -size))]


def _balanced(work, cap, num_ranks, num_mb, iterations):
    n = len(work)
    ranks = _Bins(num_ranks, work, cap, scale=num_mb, exact=False)
    left = _greedy(ranks, _lpt_order(work, list(range(n))))
    if left:
        raise ValueError(f"cannot place {len(left)} of {n} samples on {num_ranks} ranks x {num_mb} microbatches: "
                         f"aggregate capacity exceeded (per microbatch max_tokens={cap.max_tokens}, "
                         f"max_instances={cap.max_instances.tolist()}; the batch has {int(cap.tokens.sum())} tokens, "
                         f"{cap.instances.sum(axis=0).astype(int).tolist()} instances)")
    _refine(ranks, iterations)
    out, leftovers = [], []
    for r in range(num_ranks):
        mbs = _Bins(num_mb, work, cap, scale=1, exact=True)
        mbs.norm = ranks.norm * num_mb  # every microbatch in the units of the global mean microbatch load
        leftovers += [(r, i) for i in _greedy(mbs, _lpt_order(work, list(ranks.items[r])))]
        _refine(mbs, iterations)
        out.append(mbs)
    # Samples their rank could not pack go to the least loaded microbatch anywhere that takes them.
    for _, i in leftovers:
        cands = sorted(((float(m.scores(m.load[b] + work[i])), r, b) for r, m in enumerate(out)
                        for b in range(num_mb)))
        for _, r, b in cands:
            m = out[r]
            if m.aggregate_ok(m.tok[b] + cap.tokens[i], m.inst[b] + cap.instances[i]) and m.exact_ok(m.items[b] + [i]):
                m.add(b, i)
                break
        else:
            raise ValueError(f"sample {i} ({int(cap.tokens[i])} tokens) fits in no microbatch of "
                             f"{num_ranks} ranks x {num_mb}: the global batch is too large for the buckets")
    return [[sorted(m.items[b]) for b in range(num_mb)] for m in out]


def _equal_counts(order, cap, num_ranks, num_mb):
    bins_n = num_ranks * num_mb
    chunks = np.array_split(np.asarray(order, int), bins_n)
    flat = _Bins(bins_n, np.zeros((len(order), 1)), cap, scale=1, exact=True)
    for b, c in enumerate(chunks):
        for i in c:
            flat.add(b, int(i))
    # Repair: a microbatch over capacity hands its largest samples to the first microbatch that takes them.
    for b in range(bins_n):
        while not (flat.aggregate_ok(flat.tok[b], flat.inst[b]) and flat.exact_ok(flat.items[b])):
            i = max(flat.items[b], key=lambda x: (cap.tokens[x], x))
            flat.remove(b, i)
            for c in range(bins_n):
                if c != b and flat.aggregate_ok(flat.tok[c] + cap.tokens[i], flat.inst[c] + cap.instances[i]) \
                        and flat.exact_ok(flat.items[c] + [i]):
                    flat.add(c, i)
                    break
            else:
                raise ValueError(f"sample {i} ({int(cap.tokens[i])} tokens) fits in no microbatch of {num_ranks} "
                                 f"ranks x {num_mb}: the global batch is too large for the buckets")
    return [[list(flat.items[r * num_mb + m]) for m in range(num_mb)] for r in range(num_ranks)]


def assign(workloads, *, num_ranks: int, num_microbatches: int, method: str = "balanced", seed=0,
           capacity: Capacity | None = None, refine_iterations: int = 200):
    """Sample indices per [rank][microbatch] covering every sample exactly once.

    workloads: [n, k] (k objectives, e.g. encoder and LLM FLOPs). seed: anything np.random.default_rng takes (used
    by "random")."""
    work = np.asarray(workloads, np.float64)
    if work.ndim == 1:
        work = work[:, None]
    n = len(work)
    if method not in METHODS:
        raise ValueError(f"microbatch assignment method must be one of {METHODS}; got {method!r}")
    if num_ranks <= 0 or num_microbatches <= 0:
        raise ValueError(f"num_ranks and num_microbatches must be positive; got {num_ranks}, {num_microbatches}")
    if np.any(work < 0) or not np.all(np.isfinite(work)):
        raise ValueError("workloads must be finite and non-negative")
    cap = capacity if capacity is not None else Capacity.unlimited(n)
    if len(cap.tokens) != n:
        raise ValueError(f"capacity describes {len(cap.tokens)} samples; workloads has {n}")
    if method == "balanced":
        return _balanced(work, cap, num_ranks, num_microbatches, refine_iterations)
    order = list(range(n)) if method == "sequential" else [int(i) for i in np.random.default_rng(seed).permutation(n)]
    return _equal_counts(order, cap, num_ranks, num_microbatches)


def microbatch_loads(assignment, workloads) -> np.ndarray:
    """[ranks, microbatches, k] summed workloads."""
    work = np.asarray(workloads, np.float64)
    work = work[:, None] if work.ndim == 1 else work
    return np.asarray([[work[list(mb)].sum(axis=0) if len(mb) else np.zeros(work.shape[1]) for mb in rank]
                       for rank in assignment])


def coefficient_of_variation(x) -> float:
    x = np.asarray(x, np.float64).reshape(-1)
    m = x.mean()
    return float(x.std() / m) if m > 0 else 0.0


def predicted_step_time(loads_RMk, *, pipeline_stages: int = 1, encoder_column: int | None = 0) -> float:
    """Max over ranks of the rank's time. Encoder work (column ``encoder_column``) runs outside the pipeline and adds
    its sum; the LLM work (the other columns) runs as 1F1B over ``pipeline_stages`` stages:
    sum_m w_m / P + (P - 1) * max_m w_m / P (with P = 1, simply the sum)."""
    loads = np.asarray(loads_RMk, np.float64)
    p = int(pipeline_stages)
    if p <= 0:
        raise ValueError(f"pipeline_stages must be positive; got {pipeline_stages}")
    cols = list(range(loads.shape[-1]))
    enc = loads[..., encoder_column].sum(axis=-1) if encoder_column is not None else 0.0
    llm = loads[..., [c for c in cols if c != encoder_column]].sum(axis=-1)  # [R, M]
    per_rank = enc + llm.sum(axis=-1) / p + (p - 1) * llm.max(axis=-1) / p
    return float(per_rank.max())
