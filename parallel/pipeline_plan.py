"""Frozen-aware pipeline planner: layers per stage and where the encoders run, by the cost model.

1F1B predicts an iteration as (M - 1) * max stage + sum of stages (per-microbatch stage costs, forward + backward).
With the encoders outside the pipeline the sum is fixed, so the planner minimises the max stage cost: an exact DP
over contiguous splits (uneven counts allowed) under a per-device memory budget. It compares that against putting
every encoder on its own stages (Cornstarch's modal-parallel placement, encoders running concurrently into the LLM's
first stage) and picks the faster; it also reports Cornstarch's fixed placement and a frozen-unaware
(Megatron-like) split, all on the same cost model. Communication is not modelled.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np

from mllm_jax.config import ModelConfig
from parallel.config import ParallelConfig
from parallel.cost_model import CostedLayer, ModelCosts, model_costs, stage_memory

INF = float("inf")


def pipeline_time(stage_costs, microbatches: int) -> float:
    """1F1B iteration time of one linear pipeline: (M - 1) * max stage + sum of stages."""
    if microbatches < 1:
        raise ValueError(f"microbatches must be >= 1; got {microbatches}")
    stage_costs = list(stage_costs)
    return (microbatches - 1) * max(stage_costs) + sum(stage_costs)


def in_flight(stage: int, stages: int, microbatches: int) -> int:
    """Microbatches whose activations a 1F1B stage holds at its peak: warm-up forwards + 1, capped at M."""
    return min(microbatches, stages - stage)


def uniform_split(n_layers: int, stages: int) -> tuple:
    """Layer counts as even as possible (earlier stages take the remainder)."""
    if stages < 1 or n_layers < stages:
        raise ValueError(f"cannot split {n_layers} layers into {stages} non-empty stages")
    base, rem = divmod(n_layers, stages)
    return tuple(base + (1 if s < rem else 0) for s in range(stages))


def split_chain(chain, counts):
    """Cut a list into consecutive pieces of the given sizes."""
    out, start = [], 0
    for c in counts:
        out.append(list(chain[start : start + c]))
        start += c
    return out


def min_max_split(
    chain,
    stages: int,
    *,
    microbatches: int = 1,
    first_extra=(),
    last_extra=(),
    memory_budget: float = INF,
    tensor: int = 1,
    in_flight_offset: int = 0,
    cost=lambda c: c.total,
):
    """Exact min over contiguous splits of ``chain`` (CostedLayers) into ``stages`` non-empty stages of the max stage
    cost, each stage within ``memory_budget`` bytes per device. ``first_extra`` / ``last_extra`` ride on the first /
    last stage (embedding, head). Stage s holds min(M, stages - s + in_flight_offset) microbatches in flight.
    Returns the counts, or None when no split fits the budget."""
    n = len(chain)
    if stages < 1 or n < stages:
        raise ValueError(f"cannot split {n} layers into {stages} non-empty stages")
    c_pre = np.concatenate([[0.0], np.cumsum([cost(c) for c in chain])])
    fixed_pre = np.concatenate([[0.0], np.cumsum([c.param_bytes + c.state_bytes for c in chain])])
    act_pre = np.concatenate([[0.0], np.cumsum([c.act_bytes for c in chain])])

    def extra(layers):
        return (
            sum(cost(c) for c in layers),
            sum(c.param_bytes + c.state_bytes for c in layers),
            sum(c.act_bytes for c in layers),
        )

    first, last = extra(first_extra), extra(last_extra)

    def stage(s, j, i):  # layers j..i-1 on stage s -> (cost, memory)
        c, fixed, act = c_pre[i] - c_pre[j], fixed_pre[i] - fixed_pre[j], act_pre[i] - act_pre[j]
        for flag, (ec, ef, ea) in ((s == 0, first), (s == stages - 1, last)):
            if flag:
                c, fixed, act = c + ec, fixed + ef, act + ea
        flight = min(microbatches, stages - s + in_flight_offset)
        return c, (fixed + flight * act) / tensor

    # best[s][i]: min over splits of chain[:i] into s+1 stages of the max stage cost.
    best = np.full((stages, n + 1), INF)
    arg = np.zeros((stages, n + 1), dtype=np.int64)
    for i in range(1, n - stages + 2):
        c, mem = stage(0, 0, i)
        if mem <= memory_budget:
            best[0, i] = c
    for s in range(1, stages):
        for i in range(s + 1, n - stages + s + 2):
            for j in range(s, i):
                if best[s - 1, j] == INF:
                    continue
                c, mem = stage(s, j, i)
                if mem > memory_budget:
                    continue
                v = max(best[s - 1, j], c)
                if v < best[s, i]:
                    best[s, i], arg[s, i] = v, j
    if best[stages - 1, n] == INF:
        return None
    counts, i = [], n
    for s in range(stages - 1, -1, -1):
        j = arg[s, i] if s > 0 else 0
        counts.append(i - j)
        i = j
    return tuple(int(c) for c in reversed(counts))


@dataclass(frozen=True)
class Placement:
    """One evaluated placement. Stages are listed LLM first, then each encoder's own stages (empty when the
    encoders run outside the pipeline)."""

    name: str
    encoders_outside: bool
    llm_stage_layers: tuple
    encoder_stage_layers: dict  # name -> tuple of per-stage counts (chain = stem, layers, projector)
    llm_stage_costs: tuple
    encoder_stage_costs: dict  # name -> tuple
    encoder_time: float  # outside: encoder forward + backward spread over all devices (serial with the pipeline)
    predicted_time: float
    stage_memory: tuple  # bytes per device per stage (LLM stages, then encoder stages)
    fits_memory: bool

    @property
    def all_stage_costs(self) -> tuple:
        out = list(self.llm_stage_costs)
        for name in self.encoder_stage_costs:
            out += list(self.encoder_stage_costs[name])
        return tuple(out)

    @property
    def balance(self) -> float:
        """max / mean stage cost (1.0 = perfectly balanced)."""
        c = self.all_stage_costs
        return max(c) / (sum(c) / len(c))


@dataclass(frozen=True)
class PipelinePlan:
    chosen: Placement
    cornstarch: Placement | None
    megatron_like: Placement | None
    uniform: Placement
    microbatches: int
    stages: int
    tensor: int
    device_flops: float
    memory_budget: float
    alternatives: tuple = field(default=())

    @property
    def llm_stage_layers(self) -> tuple:
        return self.chosen.llm_stage_layers

    @property
    def predicted_time(self) -> float:
        return self.chosen.predicted_time


def _seconds(flops, tensor, device_flops):
    return flops / (tensor * device_flops)


def _evaluate_outside(name, costs: ModelCosts, counts, M, tensor, device_flops, budget, stages) -> Placement:
    pieces = split_chain(costs.llm, counts)
    pieces[0] = [costs.embed] + pieces[0]
    pieces[-1] = pieces[-1] + [costs.head]
    stage_c = tuple(_seconds(sum(c.total for c in p), tensor, device_flops) for p in pieces)
    # Encoders: every device encodes its share of the M microbatches' instances, forward before and backward after
    # the pipeline; no bubble, but serial with it.
    share = math.ceil(M / stages)
    enc_layers = [c for chain in costs.encoders.values() for c in chain]
    enc_time = share * _seconds(sum(c.total for c in enc_layers), tensor, device_flops)
    enc_mem = stage_memory(enc_layers, in_flight=share, tensor=tensor)["total"]
    mem = tuple(
        stage_memory(p, in_flight=in_flight(s, stages, M), tensor=tensor)["total"] + enc_mem
        for s, p in enumerate(pieces)
    )
    return Placement(
        name,
        True,
        tuple(counts),
        {},
        stage_c,
        {},
        enc_time,
        enc_time + pipeline_time(stage_c, M),
        mem,
        max(mem) <= budget,
    )


def _evaluate_own_stages(name, costs, llm_counts, enc_counts, M, tensor, device_flops, budget) -> Placement:
    n_llm = len(llm_counts)
    pieces = split_chain(costs.llm, llm_counts)
    pieces[0] = [costs.embed] + pieces[0]
    pieces[-1] = pieces[-1] + [costs.head]
    llm_c = tuple(_seconds(sum(c.total for c in p), tensor, device_flops) for p in pieces)
    mem = [stage_memory(p, in_flight=in_flight(s, n_llm, M), tensor=tensor)["total"] for s, p in enumerate(pieces)]
    enc_c = {}
    longest_branch = 0.0
    for enc, counts in enc_counts.items():
        e_pieces = split_chain(costs.encoders[enc], counts)
        enc_c[enc] = tuple(_seconds(sum(c.total for c in p), tensor, device_flops) for p in e_pieces)
        longest_branch = max(longest_branch, sum(enc_c[enc]))
        n_e = len(counts)
        # Encoder stage j of S_e holds S_e + S_L - j microbatches (Cornstarch's warm-up + 1), capped at M.
        mem += [
            stage_memory(p, in_flight=min(M, n_e + n_llm - j), tensor=tensor)["total"] for j, p in enumerate(e_pieces)
        ]
    all_c = list(llm_c) + [c for v in enc_c.values() for c in v]
    # Concurrent encoder branches feed the LLM's first stage: the critical path is the longest branch + the LLM.
    t = (M - 1) * max(all_c) + longest_branch + sum(llm_c)
    return Placement(
        name, False, tuple(llm_counts), dict(enc_counts), llm_c, enc_c, 0.0, t, tuple(mem), max(mem) <= budget
    )


def _split_module(chain, stages, M, tensor, budget, offset, first=(), last=(), frozen_unaware_chain=None):
    """Balanced split of one module's chain; a frozen-unaware planner balances its own (wrong) costs."""
    ref = frozen_unaware_chain if frozen_unaware_chain is not None else chain
    counts = min_max_split(
        ref,
        stages,
        microbatches=M,
        first_extra=first,
        last_extra=last,
        memory_budget=budget,
        tensor=tensor,
        in_flight_offset=offset,
    )
    if counts is None:  # nothing fits: report the unconstrained split (flagged as not fitting)
        counts = min_max_split(ref, stages, microbatches=M, first_extra=first, last_extra=last, in_flight_offset=offset)
    return counts


def _own_stage_placement(name, costs, stage_counts, M, tensor, device_flops, budget, unaware=None):
    """stage_counts: {"llm": n, encoder: n}; layers split per module by min-max (frozen-unaware if ``unaware``)."""
    n_llm = stage_counts["llm"]
    enc_counts = {}
    for enc in costs.encoders:
        n_e = stage_counts[enc]
        enc_counts[enc] = _split_module(
            costs.encoders[enc],
            n_e,
            M,
            tensor,
            budget,
            n_llm,
            frozen_unaware_chain=None if unaware is None else unaware.encoders[enc],
        )
    llm_counts = _split_module(
        costs.llm,
        n_llm,
        M,
        tensor,
        budget,
        0,
        first=[costs.embed] if unaware is None else [unaware.embed],
        last=[costs.head] if unaware is None else [unaware.head],
        frozen_unaware_chain=None if unaware is None else unaware.llm,
    )
    return _evaluate_own_stages(name, costs, llm_counts, enc_counts, M, tensor, device_flops, budget)


def _stage_allocations(total, encoders):
    """Every (llm, encoder...) stage-count allocation summing to ``total`` with each module >= 1 stage."""
    k = len(encoders)
    for enc_counts in itertools.product(range(1, total), repeat=k):
        n_llm = total - sum(enc_counts)
        if n_llm >= 1:
            yield {"llm": n_llm, **dict(zip(encoders, enc_counts))}


def plan_pipeline(
    config: ModelConfig,
    parallel: ParallelConfig,
    *,
    text_tokens: int,
    instances: dict | None = None,
    encoder_tokens: dict | None = None,
    feature_tokens: dict | None = None,
    microbatch_size: int = 1,
    memory_budget: float = INF,
    remat: bool | None = None,
    device_flops: float = 1.0,
    placement: str = "auto",
    cornstarch_stages: dict | None = None,
    megatron_stages: dict | None = None,
    llm_profile: dict | None = None,
) -> PipelinePlan:
    """Choose the LLM layers per pipeline stage and where the encoders run.

    ``parallel.pipeline`` stages and ``parallel.microbatches`` microbatches (of ``microbatch_size`` sequences of
    ``text_tokens`` text tokens plus the injected features), ``memory_budget`` bytes per device, ``device_flops``
    FLOP/s per device (1.0 reports FLOPs). ``placement``: "auto" (the faster), "outside" or "own_stages".
    ``cornstarch_stages`` / ``megatron_stages``: {"llm": n, encoder: n} stage counts of the baselines (default:
    each encoder one stage, the LLM the rest; Megatron-like: the allocation a frozen-unaware planner prefers);
    their totals may differ from ``parallel.pipeline``.
    """
    stages, M, tensor = parallel.pipeline, parallel.microbatches, parallel.tensor
    if placement not in ("auto", "outside", "own_stages"):
        raise ValueError(f"placement must be auto, outside or own_stages; got {placement!r}")
    if stages < 1 or M < 1:
        raise ValueError(f"pipeline stages and microbatches must be >= 1; got {stages} and {M}")
    n_layers = config.llm.n_layers
    if n_layers < stages:
        raise ValueError(f"the LLM has {n_layers} layers, fewer than the {stages} pipeline stages")
    kw = dict(
        text_tokens=text_tokens,
        instances=instances,
        encoder_tokens=encoder_tokens,
        feature_tokens=feature_tokens,
        batch=microbatch_size,
        remat=remat,
        llm_profile=llm_profile,
    )
    costs = model_costs(config, **kw)
    unaware = model_costs(config, frozen_aware=False, **kw)
    args = (M, tensor, device_flops, memory_budget)

    outside_counts = min_max_split(
        costs.llm,
        stages,
        microbatches=M,
        first_extra=[costs.embed],
        last_extra=[costs.head],
        memory_budget=memory_budget,
        tensor=tensor,
    )
    fits = outside_counts is not None
    if not fits:
        outside_counts = min_max_split(
            costs.llm, stages, microbatches=M, first_extra=[costs.embed], last_extra=[costs.head]
        )
    outside = _evaluate_outside("ours:outside", costs, outside_counts, M, tensor, device_flops, memory_budget, stages)
    uniform = _evaluate_outside(
        "uniform", costs, uniform_split(n_layers, stages), M, tensor, device_flops, memory_budget, stages
    )
    enc_names = list(config.encoders)
    candidates = [outside]
    best_own = None
    if enc_names and placement != "outside" and stages > len(enc_names):
        for alloc in _stage_allocations(stages, enc_names):
            if alloc["llm"] > n_layers or any(alloc[e] > len(costs.encoders[e]) for e in enc_names):
                continue
            p = _own_stage_placement("ours:own_stages", costs, alloc, *args)
            if best_own is None or (p.fits_memory, -p.predicted_time) > (best_own.fits_memory, -best_own.predicted_time):
                best_own = p
        if best_own is not None:
            candidates.append(best_own)
    if placement == "outside":
        chosen = outside
    elif placement == "own_stages":
        if best_own is None:
            raise ValueError(f"own_stages needs encoders and more than {len(enc_names)} stages; got {stages}")
        chosen = best_own
    else:
        chosen = min(candidates, key=lambda p: (not p.fits_memory, p.predicted_time))

    cornstarch = megatron = None
    if enc_names and stages > len(enc_names):
        cs = cornstarch_stages or {"llm": stages - len(enc_names), **{e: 1 for e in enc_names}}
        _check_alloc(cs, enc_names, stages, "cornstarch_stages")
        cornstarch = _own_stage_placement("cornstarch", costs, cs, *args)
        if megatron_stages is None:
            # A frozen-unaware planner picks the allocation that looks best on its own cost model.
            best_ref = None
            for alloc in _stage_allocations(stages, enc_names):
                if alloc["llm"] > n_layers or any(alloc[e] > len(costs.encoders[e]) for e in enc_names):
                    continue
                ref = _own_stage_placement("ref", unaware, alloc, *args)
                if best_ref is None or ref.predicted_time < best_ref[0]:
                    best_ref = (ref.predicted_time, alloc)
            megatron_stages = best_ref[1]
        _check_alloc(megatron_stages, enc_names, stages, "megatron_stages")
        megatron = _own_stage_placement("megatron_like", costs, megatron_stages, *args, unaware=unaware)
    elif not enc_names:
        # Text-only: the frozen-unaware baseline balances layers by its own costs on the one pipeline.
        counts = min_max_split(
            unaware.llm, stages, microbatches=M, first_extra=[unaware.embed], last_extra=[unaware.head]
        )
        megatron = _evaluate_outside("megatron_like", costs, counts, M, tensor, device_flops, memory_budget, stages)
    return PipelinePlan(
        chosen, cornstarch, megatron, uniform, M, stages, tensor, device_flops, memory_budget, tuple(candidates)
    )


def _check_alloc(alloc, enc_names, stages, what):
    """A baseline's stage counts: each module >= 1 stage. The total may differ from ``stages`` (the paper's
    frozen-unaware baselines used (3, 3, 3) or (4, 2, 2) where Cornstarch used (5, 1, 1))."""
    want = {"llm", *enc_names}
    if set(alloc) != want or min(alloc.values()) < 1:
        raise ValueError(f"{what} must give each of {sorted(want)} >= 1 stage; got {alloc}")


def _fmt_placement(p: Placement, unit: str) -> list:
    lines = [
        f"  {p.name}: predicted {p.predicted_time:.4g} {unit}"
        f"{' (encoders outside: ' + format(p.encoder_time, '.4g') + ' ' + unit + ')' if p.encoders_outside else ''}"
        f", balance max/mean {p.balance:.3f}{'' if p.fits_memory else ', OVER MEMORY BUDGET'}",
        f"    LLM layers per stage {list(p.llm_stage_layers)}, stage cost {[float(f'{c:.4g}') for c in p.llm_stage_costs]}",
    ]
    for enc, counts in p.encoder_stage_layers.items():
        lines.append(
            f"    {enc} layers per stage {list(counts)} (stem + layers + projector), "
            f"stage cost {[float(f'{c:.4g}') for c in p.encoder_stage_costs[enc]]}"
        )
    lines.append(f"    memory per stage (GiB) {[round(m / 2**30, 3) for m in p.stage_memory]}")
    return lines


def format_plan(plan: PipelinePlan) -> str:
    """Human-readable plan for ``train.py --dry_run``."""
    unit = "FLOP" if plan.device_flops == 1.0 else "s"
    budget = "none" if plan.memory_budget == INF else f"{plan.memory_budget / 2**30:.2f} GiB"
    lines = [
        f"pipeline plan: {plan.stages} stages, {plan.microbatches} microbatches, tensor {plan.tensor}, "
        f"memory budget {budget}",
        "chosen:",
        *_fmt_placement(plan.chosen, unit),
        "compared on the same cost model:",
    ]
    for p in (plan.uniform, plan.cornstarch, plan.megatron_like, *plan.alternatives):
        if p is not None and p is not plan.chosen:
            lines += _fmt_placement(p, unit)
    return "\n".join(lines)
