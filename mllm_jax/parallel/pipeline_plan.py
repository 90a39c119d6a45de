"""Frozen-aware pipeline planner: layers per stage, where the encoders run, and the schedule, by the cost model.

Two predictions of an iteration:
- ``predicted_time``, the asynchronous 1F1B formula (M - 1) * max stage + sum of stages (per-microbatch stage costs,
  forward + backward), what an event-driven runtime would take; an exact min-max DP over contiguous splits (uneven
  counts allowed, per-device memory budget) minimises it when the sum is fixed.
- ``runtime_time``, what parallel.pipeline actually runs: the schedule's table (parallel.schedule: 1F1B or ZB-H1) in
  lockstep ticks (every tick ends in a ppermute), each tick as long as its slowest op, with per-stage F / B / W / BW
  op costs (``runtime_layer_ops``: remat per layer, by the frozen rule). ``plan.runtime`` is the encoders-outside
  split that minimises it (``lockstep_split``: branch and bound for 1F1B, seeded by the min-max DP; a local search
  from there for ZB-H1), under the faster schedule. Cornstarch's and the frozen-unaware placements are simulated the
  same way (encoder stages at the depths before the LLM's first stage), so every placement is compared on the
  schedule our runtime executes, with the same per-layer costs.

Per-layer costs: the analytic model (parallel.cost_model over the model's layer descriptions), or a plain table of
per-layer op costs (``LayerCosts``: forward, B, W and BW of every layer, encoders and projectors included; compiled
from the real layers for the target by mllm_jax.train.layer_costs) through ``plan_pipeline(layer_costs=...)``;
``PipelinePlan.cost_source`` says which. Communication: a fixed cost per tick when given (``tick_seconds``: the
ppermutes that end every tick), otherwise not modelled. The microbatch count: ``plan_microbatches`` plans every
divisor of a replica's rows on op costs affine in the rows (``RowCosts``) and keeps the fastest that fits memory.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass, field

import numpy as np

from mllm_jax.parallel.config import ParallelConfig, check_stage_layers
from mllm_jax.parallel.cost_model import CostedLayer, ModelCosts, PipelineCosts, backward_flops, stage_memory
from mllm_jax.parallel.bubble_encode import plan_encodes
from mllm_jax.parallel.conveyor import plan_conveyor
from mllm_jax.parallel.schedule import (OP_B, OP_BW, OP_CHARS, OP_F, OP_FB, OP_SKIP, OP_W, RUN_SCHEDULES, SCHEDULES,
                                        VIRTUAL_SCHEDULES, StageOps, build_schedule, schedule_for, simulate,
                                        tick_costs, virtual_placement, virtual_stages_of)

# The schedules the planner chooses among (GPipe holds every microbatch: a memory reference, never faster here).
SCHEDULES_PLANNED = RUN_SCHEDULES
# One chunk per device: what placements with encoder stages and the 1F1B-formula baselines run (the virtual-stage
# schedules split the LLM alone, encoders outside).
ONE_CHUNK_PLANNED = ("1f1b", "zb_h1", "1f1b_fb", "1f1b_sliced")
# Where a plan asks for a virtual-stage schedule, the one-chunk placements (encoder stages, baselines) take the
# fastest of these: the one-chunk schedules at 1F1B's activation memory, as the virtual ones are.
ONE_CHUNK_AT_1F1B_MEMORY = ("1f1b", "zb_h1", "1f1b_sliced")

INF = float("inf")

# A layer's ops as the runtime runs them (remat per layer: every backward op recomputes the forward first).
OPS = ("f", "b", "w", "bw")


@dataclass(frozen=True)
class LayerCosts:
    """Per-layer op costs from outside the analytic model, as a plain table (e.g. compiled for a target:
    mllm_jax.train.layer_costs). ``ops``: {layer name (CostedLayer.name): {op: cost}} in the planner's unit (FLOPs,
    or roofline seconds x peak FLOP/s), ops of ``OPS``: "f" the forward; "b" the forward and the input gradient;
    "w" the forward and the trainable weights' gradient; "bw" the forward and both in one vjp. A layer needs the ops
    the frozen rule runs at its position ("f" always). The loss head's "b" / "w" / "bw" is its whole forward +
    backward (it runs in the last stage's forward tick). ``source``: what the planner reports ("compiled:tpu:v5p:..."
    or "analytic"); ``figures``: the measurements behind the table, for reports."""

    ops: dict
    source: str = "table"
    figures: dict = field(default_factory=dict)


@dataclass(frozen=True)
class MeasuredLayer(CostedLayer):
    """A CostedLayer whose forward and backward come from a LayerCosts row (``ops``) instead of its Layer's FLOPs."""

    ops: dict = field(default_factory=dict)


def _rule_op(c: CostedLayer, ops: dict) -> float:
    """The backward op the frozen rule runs for ``c`` (its forward recomputed included), 0 when it runs none."""
    dx, dw = c.needs_dx, c.layer.has_trainable
    kind = "bw" if dx and dw else ("b" if dx else ("w" if dw else None))
    if kind is None:
        return 0.0
    if kind not in ops:
        raise ValueError(f"layer {c.name!r} needs its {kind!r} op cost (needs_dx={dx}, trainable={dw}); the table "
                         f"has {sorted(ops)}")
    return float(ops[kind])


def analytic_layer_costs(costs: PipelineCosts) -> LayerCosts:
    """The analytic cost model as a LayerCosts table (what ``runtime_layer_ops`` prices every op at): planning on it
    gives the plan without a table."""
    table = {}
    for c in (c for chain in _chains(costs.runtime) for c in chain):
        f = c.layer.fwd
        dw = backward_flops(c.layer, False)
        dx = backward_flops(c.layer, True) - dw
        if c is costs.runtime.head:  # its backward runs in the forward's tick, without a recompute
            back = backward_flops(c.layer, c.needs_dx)
            table[c.name] = {op: f + back for op in ("b", "w", "bw")} | {"f": f}
        else:
            table[c.name] = {"f": f, "b": f + dx, "w": f + dw, "bw": f + dx + dw}
    return LayerCosts(table, source="analytic")


def with_layer_costs(costs: PipelineCosts, table: LayerCosts) -> PipelineCosts:
    """``costs`` with the frozen-aware chains (``aware``, ``runtime``) priced by ``table``: each layer's forward its
    "f", its backward the op the frozen rule runs there (less one forward where its chain has no remat). The
    frozen-unaware chain stays the analytic one: it is what a frozen-unaware planner believes (only its relative
    costs pick that baseline's split, which is then priced on the table)."""
    missing = [c.name for chain in _chains(costs.runtime) for c in chain if c.name not in table.ops]
    if missing:
        raise ValueError(f"the layer cost table ({table.source}) has no row for layers {missing[:6]}"
                         f"{' ...' if len(missing) > 6 else ''}")

    def priced(c: CostedLayer) -> MeasuredLayer:
        ops = table.ops[c.name]
        f, op = float(ops["f"]), _rule_op(c, ops)
        remat = c.bwd > backward_flops(c.layer, c.needs_dx)  # the chain recomputes the forward in its backward
        bwd = op if (remat or op == 0.0) else max(op - f, 0.0)
        return MeasuredLayer(c.layer, f, bwd, c.needs_dx, c.act_bytes, dict(ops))

    def model(m: ModelCosts) -> ModelCosts:
        return ModelCosts({k: [priced(c) for c in v] for k, v in m.encoders.items()}, priced(m.embed),
                          [priced(c) for c in m.llm], priced(m.head), m.llm_upstream_trainable)

    return PipelineCosts(model(costs.aware), costs.unaware, model(costs.runtime))


def _chains(m: ModelCosts):
    return [m.llm, [m.embed, m.head], *m.encoders.values()]


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


# ----------------------------------------------------------------------------------------------------------------
# The runtime's step time: parallel.pipeline's schedule table in lockstep ticks.


def schedule_in_flight(stages: int, microbatches: int, kind: str, overlap: bool = False) -> tuple:
    """Per stage, the microbatches of saved inputs the planner budgets for under schedule ``kind``: 1F1B's
    min(M, S - s); the others' peak live activation slots in their table (ZB-H1: within 1F1B's largest stage's pool;
    1F1B-FB: about 2 (S - s); 1F1B-sliced: 1F1B's; per device, in slots of one chunk, under "zb_v" / "interleaved"). ``overlap``: the
    table whose messages arrive a tick later (twice the warm-up, about twice the slots)."""
    if kind in ("1f1b", "1f1b_sliced"):  # sliced: 1F1B's order, at most its slots (test_pipeline_schedule)
        kind = "1f1b"
        if not overlap:
            return tuple(min(microbatches, stages - s) for s in range(stages))
    return build_schedule(stages, microbatches, kind=kind, overlap=overlap).peak_act


def runtime_layer_ops(chain) -> dict:
    """Per LLM layer slot, what each op costs as parallel.pipeline runs it ({"f", "b", "w", "bw"} arrays): F runs the
    layer once; B its vjp for the input gradient (dX; the layer's forward recomputed from its saved input first:
    remat per layer); W its vjp for the weight gradient (dW of the trainable weights or adapters, recomputing the
    forward again); BW, the fused backward, one vjp for both. By the frozen rule: no dX where nothing upstream
    trains, no dW for frozen weights, and a frozen layer with nothing trainable upstream costs nothing. (W's vjp
    also walks the cotangents back through the layer's inside to reach its weights; the analytic costs count dW
    only: compiled per-layer costs, where given, include it.)"""
    if chain and all(isinstance(c, MeasuredLayer) for c in chain):
        return _measured_layer_ops(chain)
    f = np.array([c.layer.fwd for c in chain], dtype=np.float64)
    dw = np.array([backward_flops(c.layer, False) for c in chain], dtype=np.float64)
    dx = np.array([backward_flops(c.layer, c.needs_dx) for c in chain], dtype=np.float64) - dw
    return {
        "f": f,
        "b": np.where(dx > 0, f + dx, 0.0),
        "w": np.where(dw > 0, f + dw, 0.0),
        "bw": np.where(dx + dw > 0, f + dx + dw, 0.0),
    }


def _measured_layer_ops(chain) -> dict:
    """``runtime_layer_ops`` from each layer's table row: the ops the frozen rule runs there, 0 for the others."""
    out = {op: np.zeros(len(chain)) for op in OPS}
    for i, c in enumerate(chain):
        dx, dw = c.needs_dx, c.layer.has_trainable
        out["f"][i] = c.ops["f"]
        rule = _rule_op(c, c.ops)
        if dx:
            out["b"][i] = c.ops.get("b", rule if not dw else 0.0)
        if dw:
            out["w"][i] = c.ops.get("w", rule if not dx else 0.0)
        out["bw"][i] = rule
        if dx and dw and ("b" not in c.ops or "w" not in c.ops):
            raise ValueError(f"layer {c.name!r} has dX and dW: the split schedules need its 'b' and 'w' op costs; "
                             f"the table has {sorted(c.ops)}")
    return out


def runtime_layer_costs(chain) -> tuple:
    """(forward-op, fused-backward-op) cost of each LLM layer slot: 1F1B's two ops (``runtime_layer_ops``)."""
    ops = runtime_layer_ops(chain)
    return ops["f"], ops["bw"]


def runtime_head_cost(head: CostedLayer) -> float:
    """The last stage's loss (final norm, logits, cross entropy) forward and backward, both in its forward op."""
    if isinstance(head, MeasuredLayer):
        return _rule_op(head, head.ops) or head.fwd
    return head.layer.fwd + backward_flops(head.layer, head.needs_dx)


def stage_ops(layer_ops: dict, counts, head_cost: float = 0.0) -> StageOps:
    """Per-layer op costs (``runtime_layer_ops`` or compiled ones) summed per stage of the split ``counts``; the
    head (the loss, forward and backward) rides on the last stage's F."""
    edges = np.concatenate([[0], np.cumsum(counts)]).astype(int)
    per = {k: [float(v[edges[i] : edges[i + 1]].sum()) for i in range(len(counts))] for k, v in layer_ops.items()}
    per["f"][-1] += head_cost
    f_layers = [[float(x) for x in layer_ops["f"][edges[i] : edges[i + 1]]] for i in range(len(counts))]
    f_layers[-1][-1] += head_cost
    bw_layers = tuple(tuple(float(x) for x in layer_ops["bw"][edges[i] : edges[i + 1]]) for i in range(len(counts)))
    return StageOps(tuple(per["f"]), tuple(per["b"]), tuple(per["w"]), tuple(per["bw"]),
                    tuple(map(tuple, f_layers)), bw_layers)


def runtime_stage_ops(chain, counts, head: CostedLayer | None = None) -> StageOps:
    """Per-stage op costs of ``chain`` (the LLM's CostedLayers) split by ``counts``, as the runtime runs them."""
    return stage_ops(runtime_layer_ops(chain), counts, runtime_head_cost(head) if head is not None else 0.0)


def runtime_stage_costs(chain, counts, head: CostedLayer | None = None) -> tuple:
    """Per-stage (forward-op costs, fused-backward-op costs) of ``chain`` split by ``counts``."""
    ops = runtime_stage_ops(chain, counts, head)
    return ops.f, ops.bw


_TABLES: dict = {}


def _op_masks(stages: int, microbatches: int):
    """[T, S] masks of the forward and backward ticks of parallel.pipeline's 1F1B table (their timing does not
    depend on which stages skip the backward: a skipped backward keeps its tick and costs nothing)."""
    key = (stages, microbatches)
    if key not in _TABLES:
        ops = build_schedule(stages, microbatches).ops
        _TABLES[key] = (ops == OP_F, (ops == OP_BW) | (ops == OP_SKIP))
    return _TABLES[key]


def lockstep_time(forward_costs, backward_costs, microbatches: int) -> float:
    """Step time of the runtime's 1F1B table in lockstep: sum over ticks of the slowest stage's op."""
    F = np.asarray(forward_costs, np.float64)
    B = np.asarray(backward_costs, np.float64)
    if microbatches < 1:
        raise ValueError(f"microbatches must be >= 1; got {microbatches}")
    if F.shape != B.shape or F.ndim != 1 or F.size < 1:
        raise ValueError(f"forward_costs and backward_costs must be equal-length per-stage lists; got {F.shape}, "
                         f"{B.shape}")
    is_f, is_b = _op_masks(F.size, microbatches)
    return float((is_f * F + is_b * B).max(axis=1).sum())


def lockstep_lower_bound(forward_costs, backward_costs, microbatches: int) -> float:
    """A lower bound of ``lockstep_time`` from each stage alone: stage s runs M forwards and M backwards in ticks of
    their own, after microbatch 0's forward ticks on the stages before it and before the last microbatch's backward
    ticks on them: sum_{r<s}(F_r + B_r) + M (F_s + B_s)."""
    t = np.asarray(forward_costs, np.float64) + np.asarray(backward_costs, np.float64)
    before = np.concatenate([[0.0], np.cumsum(t)[:-1]])
    return float((before + microbatches * t).max())


@dataclass(frozen=True)
class Comm:
    """The ticks' ppermutes as planned: ``tick_seconds`` each tick (in the plan's unit), after the tick's ops or,
    with ``overlap`` (``ParallelConfig.pipeline_overlap_comm``), beside the next tick's (``schedule.simulate``)."""

    tick_seconds: float = 0.0
    overlap: bool = False


def _comm(c) -> Comm:
    return c if isinstance(c, Comm) else Comm(float(c), False)


def layers_replicated(n_layers: int, stages: int) -> bool:
    """Whether the LLM's stacked layers are stored replicated over `pipeline`: its ``layers`` rule applies only
    where the devices divide the layer count (``parallel.sharding``). Then every device keeps every layer's
    parameters and optimizer state; otherwise each keeps a block of n / S, and the runtime moves each device the
    rows its stages run, whatever the split (``pipeline.split_moves`` / ``block_moves``)."""
    return n_layers % stages != 0


def _fixed_bytes(layers, tensor: int = 1) -> float:
    return sum(c.param_bytes + c.state_bytes for c in layers) / tensor


def stored_fixed(chain, own_layers, stages: int, tensor: int = 1) -> float:
    """Parameter and optimizer-state bytes one device keeps for its LLM layers ``own_layers``: theirs, or every
    layer's where the layers are stored replicated (``layers_replicated``)."""
    return _fixed_bytes(chain if layers_replicated(len(chain), stages) else own_layers, tensor)


@dataclass(frozen=True)
class LockstepSplit:
    counts: tuple | None  # None when no split fits the memory budget
    time: float
    dp_counts: tuple | None  # the min-max DP's split (the search's seed)
    dp_time: float
    evaluated: int  # splits simulated
    exhaustive: bool  # False when the node budget ran out (the best split found is returned)


class _RuntimeChain:
    """The LLM chain as the runtime runs it (remat-costed forward / backward ops, the head on the last stage), with
    prefix sums so a stage's cost and memory are O(1): what every lockstep split search evaluates."""

    def __init__(self, chain, head, stages, microbatches, tensor, memory_budget, layer_ops=None, kind="1f1b",
                 comm: Comm | None = None):
        self.n, self.stages, self.M = len(chain), stages, microbatches
        self.comm = comm if comm is not None else Comm()
        self.flight = schedule_in_flight(stages, microbatches, kind, self.comm.overlap)
        self.tensor, self.memory_budget = tensor, memory_budget
        # Layers stored replicated over `pipeline` (the stages do not divide them): every device keeps them all.
        self.replicated = layers_replicated(len(chain), stages)
        self.ops = runtime_layer_ops(chain) if layer_ops is None else {k: np.asarray(v, np.float64)
                                                                         for k, v in layer_ops.items()}
        self.f, self.b = self.ops["f"], self.ops["bw"]
        self.head_c = runtime_head_cost(head) if head is not None else 0.0
        prefix = lambda v: np.concatenate([[0.0], np.cumsum(v)])  # noqa: E731
        self.t_pre, self.f_pre, self.b_pre = prefix(self.f + self.b), prefix(self.f), prefix(self.b)
        self.fixed_pre = prefix([c.param_bytes + c.state_bytes for c in chain])
        self.act_pre = prefix([c.act_bytes for c in chain])
        self.head_fixed = (head.param_bytes + head.state_bytes) if head is not None else 0.0
        self.head_act = head.act_bytes if head is not None else 0.0

    def fits(self, s, j, i) -> bool:
        """Layers j..i-1 on stage s fit the memory budget (stage s holds min(M, stages - s) microbatches)."""
        last = s == self.stages - 1
        own = self.fixed_pre[self.n] if self.replicated else self.fixed_pre[i] - self.fixed_pre[j]
        fixed = own + (self.head_fixed if last else 0.0)
        act = self.act_pre[i] - self.act_pre[j] + (self.head_act if last else 0.0)
        return (fixed + self.flight[s] * act) / self.tensor <= self.memory_budget

    def fits_split(self, counts) -> bool:
        """Every stage of the split ``counts`` fits."""
        e = np.concatenate([[0], np.cumsum(counts)])
        return all(self.fits(s, e[s], e[s + 1]) for s in range(self.stages))

    def simulate(self, edges) -> float:
        """lockstep_time of the split with stage boundaries ``edges`` (stages + 1 entries, 0 .. n)."""
        F = np.array([self.f_pre[edges[k + 1]] - self.f_pre[edges[k]] for k in range(self.stages)])
        B = np.array([self.b_pre[edges[k + 1]] - self.b_pre[edges[k]] for k in range(self.stages)])
        F[-1] += self.head_c
        return lockstep_time(F, B, self.M)

    def simulate_kind(self, edges, kind: str) -> float:
        """The simulated step time of the split under schedule ``kind`` (``schedule.simulate``, with the ticks'
        ppermutes of ``comm``: a constant per tick unless overlapped, so only overlap changes which split is best)."""
        if kind == "1f1b" and not self.comm.overlap:
            return self.simulate(edges)
        return simulate(stage_ops(self.ops, np.diff(edges), self.head_c), self.M, kind,
                        overlap=self.comm.overlap, tick_seconds=self.comm.tick_seconds).time


def _lockstep_seed(chain, head, rc: _RuntimeChain):
    """(dp counts or None, their lockstep time, [best time, best counts]): the min-max DP on the runtime's per-stage
    totals (forward op + backward op), improved by hill-climbing (move one boundary by one layer while that helps):
    a good incumbent early prunes more."""
    runtime_total = {id(c): float(v) for c, v in zip(chain, rc.f + rc.b)}
    if head is not None:
        runtime_total[id(head)] = rc.head_c
    dp = min_max_split(chain, rc.stages, microbatches=rc.M, last_extra=[head] if head is not None else (),
                       memory_budget=rc.memory_budget, tensor=rc.tensor, cost=lambda c: runtime_total[id(c)])
    if dp is None:
        return None, INF, [INF, None]
    dp_time = rc.simulate(np.concatenate([[0], np.cumsum(dp)]))
    if rc.replicated and not rc.fits_split(dp):  # the DP's budget counts only a stage's own layers
        return dp, dp_time, [INF, None]
    best = [dp_time, tuple(dp)]
    edges = list(np.concatenate([[0], np.cumsum(best[1])]))
    improved = True
    while improved:
        improved = False
        for k in range(1, rc.stages):
            for step in (-1, 1):
                e = list(edges)
                e[k] += step
                if not e[k - 1] < e[k] < e[k + 1]:
                    continue
                d = np.diff(e)
                if not all(rc.fits(s, e[s], e[s + 1]) for s in range(rc.stages)):
                    continue
                t = rc.simulate(np.asarray(e))
                if t < best[0] * (1 - 1e-12):
                    best[0], best[1], edges, improved = t, tuple(int(x) for x in d), e, True
    return dp, dp_time, best


def _branch_and_bound(rc: _RuntimeChain, best: list, max_nodes: int) -> tuple:
    """Depth-first over the stage boundaries, improving ``best`` ([time, counts]) in place; a partial split is pruned
    when its lower bound reaches the best time. Returns (nodes visited, whether ``max_nodes`` ran out)."""
    n, stages, M, f, b, head_c = rc.n, rc.stages, rc.M, rc.f, rc.b, rc.head_c
    nodes = [0]
    exhausted = [False]
    eps = 1e-12
    is_f, is_b = (m.astype(np.float64) for m in _op_masks(stages, M))
    # Smallest forward / backward share of one layer's runtime cost among layers i.. (and the head).
    tot = f + b
    f_share = np.where(tot > 0, f / np.where(tot > 0, tot, 1.0), 1.0)
    b_share = np.where(tot > 0, b / np.where(tot > 0, tot, 1.0), 1.0)
    head_share = (1.0, 0.0) if head_c > 0 else (1.0, 1.0)
    f_share_min = np.minimum.accumulate(np.append(f_share, head_share[0])[::-1])[::-1]
    b_share_min = np.minimum.accumulate(np.append(b_share, head_share[1])[::-1])[::-1]
    total_all = rc.t_pre[n] + head_c  # every op of one microbatch runs in a tick of its own: a bound for M = 1

    def dfs(s, j, before, tick_max, edges):
        # tick_max [T]: per tick, the slowest op among the fixed stages 0..s-1; its sum bounds the step from below
        # (the stages still to place only lengthen ticks), and so does stage s's own term sum_{r<s} t_r + M t_s.
        if nodes[0] >= max_nodes:
            exhausted[0] = True
            return
        last = s == stages - 1
        left = stages - 1 - s  # stages after this one
        for i in (range(n, n + 1) if last else range(j + 1, n - left + 1)):
            nodes[0] += 1
            F_s = rc.f_pre[i] - rc.f_pre[j] + (head_c if last else 0.0)
            B_s = rc.b_pre[i] - rc.b_pre[j]
            t_s = F_s + B_s
            ticks = np.maximum(tick_max, is_f[:, s] * F_s + is_b[:, s] * B_s)
            bound = max(float(ticks.sum()), before + M * t_s, total_all)
            if bound >= best[0] * (1 - eps):
                break  # F_s and B_s only grow with i
            if not rc.fits(s, j, i):
                break  # so does the stage's memory
            if last:
                t = float(ticks.sum())  # every stage fixed: the bound is the simulated time
                best[0], best[1] = t, tuple(int(x) for x in np.diff(edges + [n]))
                return
            rest = (rc.t_pre[n] - rc.t_pre[i] + head_c) / left
            if before + t_s + M * rest >= best[0] * (1 - eps):
                continue
            # Some later stage r carries >= the mean ``rest`` of what is left, and its forward (backward) share is
            # at least the smallest share among the layers left: its ticks lengthen to that at least.
            lo_f, lo_b = rest * f_share_min[i], rest * b_share_min[i]
            later = np.maximum(ticks[None], is_f[:, s + 1 :].T * lo_f + is_b[:, s + 1 :].T * lo_b).sum(axis=1)
            if later.min() >= best[0] * (1 - eps):
                continue
            dfs(s + 1, i, before + t_s, ticks, edges + [i])

    dfs(0, 0, 0.0, np.zeros(is_f.shape[0]), [0])
    return nodes[0], exhausted[0]


def lockstep_split(
    chain,
    stages: int,
    *,
    microbatches: int,
    head: CostedLayer | None = None,
    memory_budget: float = INF,
    tensor: int = 1,
    max_nodes: int = 50_000,
    schedule: str = "1f1b",
    layer_ops: dict | None = None,
    comm: Comm | None = None,
) -> LockstepSplit:
    """The contiguous split of ``chain`` (remat-costed LLM layers) into ``stages`` non-empty stages with the least
    ``lockstep_time`` under ``memory_budget`` bytes per device (stage s holds min(M, stages - s) microbatches of
    saved slot inputs). Branch and bound: depth-first over the stage boundaries, a partial split pruned when its
    lower bound (the fixed stages' ``lockstep_lower_bound`` terms, and the rest's mean stage after every fixed stage)
    reaches the best time found; the min-max DP's split, improved by moving single boundaries, seeds the incumbent, so
    it is kept wherever nothing beats it. Exhaustive (hence exact) unless ``max_nodes`` runs out first (reported in
    ``exhaustive``): small pipelines always finish, 8 stages of 64 layers may not.

    ``schedule`` "zb_h1" / "1f1b_fb": its table depends on which stages have weight gradients, so the search is
    local: from the 1F1B split, the DP's and the uniform one, single-boundary moves while the schedule's time improves
    (``exhaustive`` False; never slower than the uniform split). ``layer_ops``: per-layer op costs ({"f", "b", "w",
    "bw"}, e.g. compiled) instead of the analytic ``runtime_layer_ops(chain)``. ``comm``: the ticks' ppermutes in
    the unit of the costs; overlapped (``Comm.overlap``), a tick lasts max(op, ppermute) and the warm-up is deeper,
    so the search is the same local one on that table (and its memory) for every schedule.

    Memory: a device keeps its stage's layers, or every layer where they are stored replicated over `pipeline`
    (``layers_replicated``: the stages do not divide the layer count)."""
    if stages < 1 or len(chain) < stages:
        raise ValueError(f"cannot split {len(chain)} layers into {stages} non-empty stages")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}; got {schedule!r}")
    comm = comm if comm is not None else Comm()
    rc = _RuntimeChain(chain, head, stages, microbatches, tensor, memory_budget, layer_ops)  # the 1F1B search
    dp, dp_time, best = _lockstep_seed(chain, head, rc)
    nodes, exhausted = _branch_and_bound(rc, best, max_nodes)
    dp = None if dp is None else tuple(int(c) for c in dp)
    if (schedule == "1f1b" and not comm.overlap) or best[1] is None:
        return LockstepSplit(best[1], best[0], dp, dp_time, nodes, not exhausted)
    # Climbs from the 1F1B optimum, the DP's split and the uniform one (a single-boundary climb is local: from the
    # 1F1B optimum alone it can end slower than the uniform split under 1F1B-FB), on the schedule's own table and
    # what it holds in flight.
    rc = _RuntimeChain(chain, head, stages, microbatches, tensor, memory_budget, layer_ops, schedule, comm)
    seeds = {best[1], dp, uniform_split(len(chain), stages)}
    starts = [c for c in seeds if c is not None and rc.fits_split(c)]
    if not starts:
        return LockstepSplit(None, INF, dp, INF, nodes, False)
    found = [_climb(rc, start, schedule) for start in starts]
    t, counts, evaluated = min(found, key=lambda r: r[0])
    return LockstepSplit(counts, t, dp, rc.simulate_kind(np.concatenate([[0], np.cumsum(dp)]), schedule),
                         nodes + sum(r[2] for r in found), False)


def _climb(rc: _RuntimeChain, counts, kind: str) -> tuple:
    """(time, counts, splits evaluated): move single stage boundaries by one layer while ``kind``'s simulated time
    improves (within the memory budget)."""
    def edges(c):
        return np.concatenate([[0], np.cumsum(c)])

    return _climb_counts(counts, lambda c: rc.simulate_kind(edges(c), kind), rc.fits_split)


def _climb_counts(counts, time_of, fits) -> tuple:
    """(time, counts, splits evaluated): move single stage boundaries by one layer (at least one layer a stage)
    while ``time_of(counts)`` improves, among the splits that ``fits``."""
    counts = [int(c) for c in counts]
    best, evaluated, improved = time_of(counts), 1, True
    while improved:
        improved = False
        for k in range(1, len(counts)):
            for step in (-1, 1):
                c = list(counts)
                c[k - 1] += step
                c[k] -= step
                if min(c[k - 1], c[k]) < 1 or not fits(c):
                    continue
                t = time_of(c)
                evaluated += 1
                if t < best * (1 - 1e-12):
                    best, counts, improved = t, c, True
    return best, tuple(counts), evaluated


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
    # Encoders outside only: the step time parallel.pipeline takes (encoders + lockstep ticks, ``lockstep_time``)
    # and its per-stage (forward-op, backward-op) costs.
    runtime_time: float | None = None
    runtime_stage_ops: tuple | None = None
    # The schedule the runtime time is simulated under (the faster of SCHEDULES_PLANNED unless one was asked for),
    # the pipeline's bubble fraction under it (1 - work / (stages x time)), and 1F1B's on the same stages and costs.
    schedule: str | None = None
    bubble_fraction: float | None = None
    runtime_time_1f1b: float | None = None
    bubble_fraction_1f1b: float | None = None
    # "1f1b_sliced": how the runtime cuts the stages' ops into ticks (schedule.Slicing; what the train step passes
    # to the runtime, so it runs the table simulated here).
    slicing: object = None
    # Microbatches whose encoders' forwards run in the pipeline's idle warm-up ticks (``with_bubble_encodes``; the
    # others' before the pipeline, counted in ``encoder_time``).
    encoders_in_bubbles: int = 0

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
    # Encoders outside with the split that minimises the runtime's lockstep step time (what train.pipelined_step
    # runs), and how the search found it.
    runtime: Placement | None = None
    lockstep_search: LockstepSplit | None = None
    cost_source: str = "analytic"  # the per-layer costs planned on: "analytic", or a LayerCosts table's source
    # plan_microbatches: every microbatch count it simulated (MicrobatchChoice), the plan's own among them.
    microbatch_choices: tuple = field(default=())
    tick_seconds: float = 0.0  # the fixed cost per tick planned with (the ppermutes), in the plan's unit
    in_flight: int | None = None  # ParallelConfig.pipeline_in_flight, planned with (zb_v's pacing)

    @property
    def llm_stage_layers(self) -> tuple:
        return self.chosen.llm_stage_layers

    @property
    def predicted_time(self) -> float:
        return self.chosen.predicted_time


def _seconds(flops, tensor, device_flops):
    return flops / (tensor * device_flops)


def _pick_schedule(sims: dict, kind: str):
    """(kind, its Simulation): the asked-for one, or the fastest for "auto" (the earlier in SCHEDULES_PLANNED on
    ties: 1F1B first)."""
    if kind != "auto":
        return kind, sims[kind]
    k = min(sims, key=lambda x: (sims[x].time, SCHEDULES_PLANNED.index(x)))
    return k, sims[k]


def _simulations(ops: StageOps, M, kind, tick_seconds: float | Comm = 0.0) -> dict:
    """Each one-chunk schedule's Simulation (a virtual-stage ``kind`` is priced by its own placement,
    ``_evaluate_virtual``: here it stands for ``ONE_CHUNK_AT_1F1B_MEMORY``); ``tick_seconds`` (the per-tick
    ppermute, not overlapped with compute) is added to the time of every tick, so it counts as bubble (no stage
    computes while it runs)."""
    if kind in VIRTUAL_SCHEDULES:
        kinds = ONE_CHUNK_AT_1F1B_MEMORY
    else:
        kinds = ONE_CHUNK_PLANNED if kind == "auto" else tuple(dict.fromkeys(("1f1b", kind)))
    comm = _comm(tick_seconds)
    return {k: simulate(ops, M, k, overlap=comm.overlap, tick_seconds=comm.tick_seconds) for k in kinds}


def _llm_pieces(costs: ModelCosts, counts) -> list:
    """The LLM's chain split by ``counts``, the embedding on the first stage and the head (the loss) on the last."""
    pieces = split_chain(costs.llm, counts)
    pieces[0] = [costs.embed] + pieces[0]
    pieces[-1] = pieces[-1] + [costs.head]
    return pieces


def _encoders_outside(costs: ModelCosts, M, stages, tensor, device_flops) -> tuple:
    """(time, bytes per device) of the encoders run outside the pipeline: every device encodes its share of the M
    microbatches' instances, forward before and backward after the pipeline; no bubble, but serial with it."""
    share = math.ceil(M / stages)
    enc_layers = [c for chain in costs.encoders.values() for c in chain]
    return (share * _seconds(sum(c.total for c in enc_layers), tensor, device_flops),
            stage_memory(enc_layers, in_flight=share, tensor=tensor)["total"])


def _ops_in_seconds(rt: ModelCosts, counts, tensor, device_flops) -> StageOps:
    """The runtime's per-stage op costs of the split ``counts``, in seconds on ``tensor`` devices of
    ``device_flops``."""
    return runtime_stage_ops(rt.llm, counts, rt.head).scaled(_seconds(1.0, tensor, device_flops))


def _evaluate_outside(name, costs: ModelCosts, counts, M, tensor, device_flops, budget, stages,
                      runtime_costs: ModelCosts | None = None, schedule: str = "auto",
                      tick_seconds: float = 0.0) -> Placement:
    stage_c = tuple(_seconds(sum(c.total for c in p), tensor, device_flops) for p in _llm_pieces(costs, counts))
    enc_time, enc_mem = _encoders_outside(costs, M, stages, tensor, device_flops)
    # Memory as the runtime holds it (its remat costs: each slot's input per microbatch in flight).
    rt = runtime_costs if runtime_costs is not None else costs
    rt_pieces = _llm_pieces(rt, counts)

    # What a device stores beyond its stage's own layers (all of them, where they are stored replicated).
    extra = [stored_fixed(rt.llm, mine, stages, tensor) - _fixed_bytes(mine, tensor)
             for mine in split_chain(rt.llm, counts)]

    def memory(kind):
        flight = schedule_in_flight(stages, M, kind, _comm(tick_seconds).overlap)
        return tuple(stage_memory(p, in_flight=flight[s], tensor=tensor)["total"] + enc_mem + extra[s]
                     for s, p in enumerate(rt_pieces))

    ops = _ops_in_seconds(rt, counts, tensor, device_flops)
    sims = _simulations(ops, M, schedule, tick_seconds)
    if schedule in VIRTUAL_SCHEDULES:
        schedule = "auto"
    if schedule == "auto":  # the fastest schedule whose activations fit the budget (1F1B when none does)
        fitting = {k: v for k, v in sims.items() if k == "1f1b" or max(memory(k)) <= budget}
        kind, sim = _pick_schedule(fitting, "auto")
    else:
        kind, sim = _pick_schedule(sims, schedule)
    mem = memory(kind)
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
        enc_time + sim.time,
        (ops.f, ops.bw),
        kind,
        sim.bubble_fraction,
        enc_time + sims["1f1b"].time,
        sims["1f1b"].bubble_fraction,
        sim.schedule.slicing,
    )


# ----------------------------------------------------------------------------------------------------------------
# Encoders in the bubbles (parallel.bubble_encode): frozen encoders' forwards in the idle warm-up ticks.


def _encoder_layers(costs: ModelCosts, kind: str) -> list:
    """Every encoder chain's layers of ``kind`` ("encoders" or "projectors")."""
    return [c for chain in costs.encoders.values() for c in chain if c.layer.module.startswith(kind + "/")]


def encoders_frozen(costs: ModelCosts) -> bool:
    """The model has encoders and nothing in them trains (projectors may): their forwards can run in bubbles."""
    enc = _encoder_layers(costs, "encoders")
    return bool(enc) and not any(c.layer.has_trainable for c in enc)


def encode_cost(rt: ModelCosts) -> float:
    """One microbatch's encode in a bubble: every encoder's forward and its projector's."""
    return float(sum(c.fwd for chain in rt.encoders.values() for c in chain))


def _tick_maxima(rt: ModelCosts, counts, sched) -> np.ndarray:
    """[ticks]: what each tick of ``sched`` lasts (its slowest op) with the runtime's op costs of the split
    ``counts``."""
    return tick_costs(sched, runtime_stage_ops(rt.llm, counts, rt.head)).max(axis=1)


def bubble_encodes(rt: ModelCosts, counts, sched, microbatches: int, tick_cost=None):
    """The encodes (one microbatch each, ``encode_cost``) that fit in ``sched``'s idle ticks, each tick priced by the
    runtime's op costs of the split ``counts`` (``tick_cost``: those ticks' costs when already made;
    ``bubble_encode.plan_encodes``): an ``EncodePlan``."""
    tick_cost = _tick_maxima(rt, counts, sched) if tick_cost is None else tick_cost
    conveyor = plan_conveyor(sched, microbatches, input_grads=False)  # the inputs' moves do not depend on it
    return plan_encodes(sched, conveyor, microbatches, encode_cost=encode_cost(rt), tick_cost=tick_cost)


# "auto" puts encodes into the bubbles only where that saves at least this share of the step: the analytic costs
# are a few percent off, and the encodes keep the encoders' weights in the compute dtype through the pipeline
# (LLaVA-7B on tpu:v5p: +0.46 GiB a device for 0.14% of its step: docs/pipeline.md).
BUBBLE_MIN_GAIN = 0.01


@dataclass(frozen=True)
class BubbleChoice:
    """One table's encodes in the bubbles (``plan``) and what they change, in the planner's unit: the encoder time
    before the pipeline with every encode outside and with the plan's inside (the other microbatches' encoders, and
    every microbatch's projector: forward for the pipeline's inputs, forward again and backward after it), the
    encodes' work inside the ticks, the bytes a device holds for them (the encoders' and projectors' weights in the
    compute dtype, through the pipeline), and the table's own time (its ticks' slowest ops, no communication)."""

    plan: object
    time_outside: float
    time_left: float
    work: float
    weight_bytes: float
    table_time: float

    def used(self, encoders: str, step_time: float) -> bool:
        """Whether ``ParallelConfig.pipeline_encoders`` = ``encoders`` runs them, for a step of ``step_time`` with
        every encoder outside: "bubbles" whenever one fits, "auto" when they save ``BUBBLE_MIN_GAIN`` of it."""
        if encoders == "outside" or not self.plan.microbatches:
            return False
        return encoders == "bubbles" or self.time_outside - self.time_left >= BUBBLE_MIN_GAIN * step_time


def bubble_choice(costs: PipelineCosts, counts, sched, M: int, stages: int, tensor: int = 1,
                  device_flops: float = 1.0, compute_bytes: float = 2.0) -> BubbleChoice:
    """The encodes ``bubble_encodes`` places on ``sched`` (the split ``counts``, M microbatches on ``stages``
    devices) and their effect (``BubbleChoice``), in seconds on ``tensor`` devices of ``device_flops`` (1.0: FLOPs)."""
    sec = lambda layers, attr: _seconds(sum(getattr(c, attr) for c in layers), tensor, device_flops)  # noqa: E731
    enc, proj = _encoder_layers(costs.aware, "encoders"), _encoder_layers(costs.aware, "projectors")
    ticks = _tick_maxima(costs.runtime, counts, sched)
    plan = bubble_encodes(costs.runtime, counts, sched, M, ticks)
    share = math.ceil(M / stages)
    outside = share * (sec(enc, "total") + sec(proj, "total"))
    left = (math.ceil((M - len(plan.microbatches)) / stages) * sec(enc, "total")
            + share * (sec(proj, "total") + sec(proj, "fwd")))
    work = float(plan.counts.sum()) * _seconds(encode_cost(costs.runtime), tensor, device_flops)
    weights = compute_bytes * sum(c.layer.params for c in enc + proj) / tensor
    return BubbleChoice(plan, outside, left, work, weights, _seconds(float(ticks.sum()), tensor, device_flops))


def with_bubble_encodes(p: Placement, costs: PipelineCosts, M, stages, tensor, device_flops, comm,
                        encoders: str = "auto", budget: float = INF) -> Placement:
    """``p`` (encoders outside, a one-chunk schedule) with its frozen encoders' forwards placed in the idle ticks of
    its table where they fit (``bubble_choice``), when ``encoders`` ("auto", "bubbles", "outside":
    ``ParallelConfig.pipeline_encoders``) takes them (``BubbleChoice.used``; "auto" also only within ``budget``
    bytes a device). The table's time is unchanged (an encode fits in its tick); the encoder time before it shrinks,
    and the bubble fraction counts the encodes as work. 1F1B's figures get 1F1B's own table's encodes."""
    if (encoders == "outside" or p.encoders_in_bubbles or not p.encoders_outside or p.schedule is None
            or p.schedule in VIRTUAL_SCHEDULES or not encoders_frozen(costs.runtime)):
        return p
    ops = _ops_in_seconds(costs.runtime, p.llm_stage_layers, tensor, device_flops)

    def choice(kind, slicing):
        sched = schedule_for(ops, M, kind, overlap=comm.overlap, slicing=slicing)
        return bubble_choice(costs, p.llm_stage_layers, sched, M, stages, tensor, device_flops)

    def moved(c: BubbleChoice, time, bubble):
        """(step time, bubble fraction) of a placement of ``time`` and ``bubble`` with ``c``'s encodes inside."""
        pipe = time - p.encoder_time
        return pipe + c.time_left, bubble - (c.work / (stages * pipe) if pipe > 0 else 0.0)

    c = choice(p.schedule, p.slicing)
    memory = tuple(m + c.weight_bytes for m in p.stage_memory)
    if not c.used(encoders, p.runtime_time) or (encoders == "auto" and max(memory) > budget):
        return p
    time, bubble = moved(c, p.runtime_time, p.bubble_fraction)
    c1 = choice("1f1b", None)
    time_1f1b, bubble_1f1b = moved(c1, p.runtime_time_1f1b, p.bubble_fraction_1f1b)
    return dataclasses.replace(
        p, encoder_time=c.time_left, predicted_time=p.predicted_time - p.encoder_time + c.time_left,
        runtime_time=time, bubble_fraction=bubble, runtime_time_1f1b=time_1f1b, bubble_fraction_1f1b=bubble_1f1b,
        stage_memory=memory, fits_memory=max(memory) <= budget, encoders_in_bubbles=len(c.plan.microbatches))


def _own_stages_runtime(rt: ModelCosts, llm_counts, enc_counts: dict, M, scale, schedule,
                        tick_seconds: float = 0.0) -> tuple:
    """Encoders on stages of their own, simulated as our lockstep runtime would run them: each encoder branch's
    stages end at the depth before the LLM's first stage (its successor), stages at one depth run the same op in the
    same tick (a tick lasts as long as the slowest of them). Returns (kind, Simulation, its bubble fraction over the
    physical stages, 1F1B's time, 1F1B's bubble fraction)."""
    def ops_of(piece, head=0.0):
        layer = runtime_layer_ops(piece)
        out = {k: float(v.sum()) / scale for k, v in layer.items()}
        out["f"] += head / scale
        return out

    llm_pieces = split_chain(rt.llm, llm_counts)
    llm_pieces[0] = [rt.embed] + llm_pieces[0]
    llm = [ops_of(p, runtime_head_cost(rt.head) if i == len(llm_pieces) - 1 else 0.0)
           for i, p in enumerate(llm_pieces)]
    depth = max(len(c) for c in enc_counts.values())
    levels = [[] for _ in range(depth)]
    for enc, counts in enc_counts.items():
        for j, piece in enumerate(split_chain(rt.encoders[enc], counts)):
            levels[depth - len(counts) + j].append(ops_of(piece))
    levels += [[o] for o in llm]
    merged = StageOps(*(tuple(max(o[k] for o in level) for level in levels) for k in ("f", "b", "w", "bw")))
    n_physical = sum(len(level) for level in levels)

    def physical_bubble(sim):
        work = 0.0
        for d, level in enumerate(levels):
            for o in level:
                per_op = np.zeros(len(OP_CHARS))
                per_op[OP_F], per_op[OP_B], per_op[OP_W], per_op[OP_BW] = o["f"], o["b"], o["w"], o["bw"]
                per_op[OP_FB] = o["f"] + o["bw"]
                work += float(per_op[sim.schedule.ops[:, d]].sum())
        return 1.0 - work / (n_physical * sim.time) if sim.time > 0 else 0.0

    sims = _simulations(merged, M, schedule, tick_seconds)
    kind, sim = _pick_schedule(sims, "auto" if schedule in VIRTUAL_SCHEDULES else schedule)
    return kind, sim, physical_bubble(sim), sims["1f1b"].time, physical_bubble(sims["1f1b"])


def _evaluate_own_stages(name, costs, llm_counts, enc_counts, M, tensor, device_flops, budget,
                         runtime: ModelCosts | None = None, schedule: str = "auto",
                         tick_seconds: float = 0.0) -> Placement:
    n_llm = len(llm_counts)
    pieces = _llm_pieces(costs, llm_counts)
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
    sim_fields = ()
    if runtime is not None:
        kind, sim, bubble, t1, bubble1 = _own_stages_runtime(runtime, llm_counts, enc_counts, M, tensor * device_flops,
                                                            schedule, tick_seconds)
        sim_fields = (sim.time, None, kind, bubble, t1, bubble1, sim.schedule.slicing)
    return Placement(
        name, False, tuple(llm_counts), dict(enc_counts), llm_c, enc_c, 0.0, t, tuple(mem), max(mem) <= budget,
        *sim_fields,
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


def _own_stage_placement(name, costs, stage_counts, M, tensor, device_flops, budget, unaware=None, runtime=None,
                         schedule="auto", tick_seconds=0.0):
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
    return _evaluate_own_stages(name, costs, llm_counts, enc_counts, M, tensor, device_flops, budget, runtime,
                                schedule, tick_seconds)


def _stage_allocations(total, encoders):
    """Every (llm, encoder...) stage-count allocation summing to ``total`` with each module >= 1 stage."""
    k = len(encoders)
    for enc_counts in itertools.product(range(1, total), repeat=k):
        n_llm = total - sum(enc_counts)
        if n_llm >= 1:
            yield {"llm": n_llm, **dict(zip(encoders, enc_counts))}


def plan_pipeline(
    costs: PipelineCosts,
    parallel: ParallelConfig,
    *,
    memory_budget: float = INF,
    device_flops: float = 1.0,
    placement: str = "auto",
    cornstarch_stages: dict | None = None,
    megatron_stages: dict | None = None,
    schedule: str | None = None,
    layer_costs: LayerCosts | None = None,
    tick_seconds: float = 0.0,
) -> PipelinePlan:
    """Choose the LLM layers per pipeline stage and where the encoders run.

    ``costs``: one microbatch's layers as the model describes them (mllm_jax.costs.pipeline_costs). ``parallel``:
    ``pipeline`` stages, ``microbatches`` microbatches, ``tensor``. ``memory_budget`` bytes per device,
    ``device_flops`` FLOP/s per device (1.0 reports FLOPs). ``placement``: "auto" (the faster), "outside" or
    "own_stages". ``cornstarch_stages`` / ``megatron_stages``: {"llm": n, encoder: n} stage counts of the baselines
    (default: each encoder one stage, the LLM the rest; Megatron-like: the allocation a frozen-unaware planner
    prefers); their totals may differ from ``parallel.pipeline``. ``schedule``: the runtime's schedule ("1f1b",
    "zb_h1", "1f1b_fb", "1f1b_sliced", ...) or "auto" (the fastest in simulation that fits the memory budget, per placement); None:
    ``parallel.pipeline_schedule`` (what the run will execute). Every placement's ``runtime_time`` is simulated tick
    by tick under it, with the same per-layer costs. ``layer_costs``: per-layer op costs to plan on instead of the
    analytic ones (a LayerCosts table, e.g. compiled for the target: mllm_jax.train.layer_costs; ``with_layer_costs``);
    the plan's ``cost_source`` says which. ``tick_seconds``: a fixed cost of every tick of the schedule, in the
    plan's unit (seconds with ``device_flops`` the chip's FLOP/s): the ppermutes that end each tick, which the runtime
    does not overlap with compute (``plan_microbatches`` prices them from the activation bytes and a link); 0: not
    modelled. The microbatch count is ``parallel.microbatches`` here; ``plan_microbatches`` chooses it.
    """
    stages, M, tensor = parallel.pipeline, parallel.microbatches, parallel.tensor
    if not tick_seconds >= 0:
        raise ValueError(f"tick_seconds must be >= 0; got {tick_seconds!r}")
    if placement not in ("auto", "outside", "own_stages"):
        raise ValueError(f"placement must be auto, outside or own_stages; got {placement!r}")
    if stages < 1 or M < 1:
        raise ValueError(f"pipeline stages and microbatches must be >= 1; got {stages} and {M}")
    schedule = parallel.pipeline_schedule if schedule is None else schedule
    if schedule != "auto" and schedule not in SCHEDULES_PLANNED:
        raise ValueError(f"schedule must be 'auto' or one of {SCHEDULES_PLANNED}; got {schedule!r}")
    if layer_costs is not None:
        costs = with_layer_costs(costs, layer_costs)
    n_layers = len(costs.aware.llm)
    if n_layers < stages:
        raise ValueError(f"the LLM has {n_layers} layers, fewer than the {stages} pipeline stages")
    args = (M, tensor, device_flops, memory_budget)
    rt_args = (M, tensor, device_flops, memory_budget, stages, costs.runtime, schedule)
    comm = Comm(tick_seconds, parallel.pipeline_overlap_comm)
    outside, uniform, runtime_placement, search = _outside_placements(costs, stages, rt_args, comm,
                                                                      parallel.pipeline_virtual_stages,
                                                                      parallel.pipeline_in_flight,
                                                                      parallel.pipeline_encoders)
    if parallel.pipeline_stage_layers is not None:  # the run's split is given: what runs is that one
        runtime_placement = with_bubble_encodes(_given_placement(costs, parallel, schedule, rt_args, comm), costs,
                                                M, stages, tensor, device_flops, comm, parallel.pipeline_encoders,
                                                memory_budget)
    best_own = _best_own_stages(costs, stages, args, schedule, comm) if placement != "outside" else None
    candidates = [outside] + ([best_own] if best_own is not None else [])
    if placement == "outside":
        chosen = outside
    elif placement == "own_stages":
        if best_own is None:
            raise ValueError(f"own_stages needs encoders and more than {len(costs.aware.encoders)} stages; got "
                             f"{stages}")
        chosen = best_own
    else:
        chosen = min(candidates, key=lambda p: (not p.fits_memory, p.predicted_time))
    cornstarch, megatron = _baselines(costs, stages, args, rt_args, cornstarch_stages, megatron_stages, comm)
    return PipelinePlan(
        chosen, cornstarch, megatron, uniform, M, stages, tensor, device_flops, memory_budget, tuple(candidates),
        runtime_placement, search, "analytic" if layer_costs is None else layer_costs.source,
        tick_seconds=tick_seconds, in_flight=parallel.pipeline_in_flight,
    )


def _given_placement(costs: PipelineCosts, parallel: ParallelConfig, schedule: str, rt_args, comm) -> Placement:
    """``parallel.pipeline_stage_layers`` priced as the runtime runs it under ``schedule`` (encoders outside)."""
    given = parallel.pipeline_stage_layers
    check_stage_layers(parallel, len(costs.aware.llm), schedule)
    V = parallel.chunks_per_device(schedule)
    if V > 1:
        return _evaluate_virtual("given", costs.aware, given, schedule, V, *rt_args[:-1], comm,
                                 parallel.pipeline_in_flight if schedule == "zb_v" else None)
    return _evaluate_outside("given", costs.aware, given, *rt_args[:-1], schedule, comm)


# ----------------------------------------------------------------------------------------------------------------
# The microbatch count: for a fixed batch per pipeline replica, M microbatches of rows / M rows each.

# How many times an op moves a layer's weights through HBM (analytic bytes): F reads them once; B recomputes the
# forward and multiplies the cotangent by them again; W recomputes and writes the weight gradient; BW all three.
WEIGHT_PASSES = {"f": 1.0, "b": 2.0, "w": 2.0, "bw": 3.0}
# ... and a microbatch's activations (its saved per-layer tensors, ``Layer.act_bytes``): F writes them, B and W
# write them again in the recompute and read them in the vjp, BW once more.
ACTIVATION_PASSES = {"f": 1.0, "b": 2.0, "w": 2.0, "bw": 3.0}


@dataclass(frozen=True)
class RowCosts:
    """Per-layer op costs as functions of a microbatch's rows: each op's FLOPs and bytes accessed are affine in the
    rows, a + b * rows (the fixed part: the layer's weights, which every op reads again whatever the microbatch;
    the per-row part: its tokens' work and activations), and its time the roofline max(FLOPs / peak, bytes / HBM
    bandwidth). ``ops``: {layer name: {op: (flops_fixed, flops_per_row, bytes_fixed, bytes_per_row)}}, ops of
    ``OPS`` as in LayerCosts; ``source`` as LayerCosts'. Fitted from compiled ops at two microbatch sizes
    (mllm_jax.train.layer_costs.compiled_row_costs) or from the analytic model (``analytic_row_costs``)."""

    ops: dict
    peak_flops: float
    hbm_bandwidth: float
    source: str = "table"

    def __post_init__(self):
        if not (self.peak_flops > 0 and self.hbm_bandwidth > 0):
            raise ValueError(f"RowCosts needs peak_flops and hbm_bandwidth > 0; got {self.peak_flops!r}, "
                             f"{self.hbm_bandwidth!r}")

    def seconds(self, layer: str, op: str, rows: float) -> float:
        ff, fr, bf, br = self.ops[layer][op]
        return max((ff + fr * rows) / self.peak_flops, (bf + br * rows) / self.hbm_bandwidth)

    def at(self, rows: float) -> LayerCosts:
        """The LayerCosts table of microbatches of ``rows`` rows, in the planner's unit: roofline seconds x peak
        (plan with ``device_flops=peak_flops`` to report seconds)."""
        if rows <= 0:
            raise ValueError(f"rows must be > 0; got {rows}")
        return LayerCosts({name: {op: self.seconds(name, op, rows) * self.peak_flops for op in ops}
                           for name, ops in self.ops.items()}, source=self.source)


def analytic_row_costs(costs_one_row: PipelineCosts, *, peak_flops: float, hbm_bandwidth: float,
                       weight_bytes: float = 2.0) -> RowCosts:
    """The analytic model as RowCosts, from its costs of a microbatch of one row: FLOPs all per row (the model's
    FLOPs are linear in the rows); bytes fixed = the layer's parameters x ``weight_bytes`` (the compute dtype's) x
    ``WEIGHT_PASSES[op]``, per row = its saved activations x ``ACTIVATION_PASSES[op]`` (an estimate of the traffic,
    not a count of it: compiled costs measure both). The embedding lookup costs nothing (a gather)."""
    flops = analytic_layer_costs(costs_one_row).ops
    table = {}
    for c in (c for chain in _chains(costs_one_row.runtime) for c in chain):
        if c.layer.fwd == 0:
            table[c.name] = {op: (0.0, 0.0, 0.0, 0.0) for op in OPS}
            continue
        wb = (c.layer.params + c.layer.lora_params) * weight_bytes
        act = c.layer.act_bytes
        table[c.name] = {op: (0.0, float(flops[c.name][op]), wb * WEIGHT_PASSES[op], act * ACTIVATION_PASSES[op])
                         for op in OPS}
    return RowCosts(table, peak_flops, hbm_bandwidth, source="analytic")


def fit_row_costs(figures: dict, *, peak_flops: float, hbm_bandwidth: float, source: str) -> RowCosts:
    """RowCosts from measured figures at two (or more) microbatch sizes: ``figures`` {rows: {layer: {op: (flops,
    bytes)}}}; FLOPs and bytes each fitted as a + b * rows by least squares over the sizes, a and b clipped at 0
    (a fixed part cannot be negative; rounding in the compiler's counts can make it so)."""
    sizes = sorted(figures)
    if len(sizes) < 2:
        raise ValueError(f"fitting a + b * rows needs figures at two microbatch sizes at least; got {sizes}")
    x = np.asarray(sizes, np.float64)

    def fit(ys):
        b, a = np.polyfit(x, np.asarray(ys, np.float64), 1)
        return max(float(a), 0.0), max(float(b), 0.0)

    first = figures[sizes[0]]
    table = {}
    for name, ops in first.items():
        table[name] = {}
        for op in ops:
            fa, fb = fit([figures[r][name][op][0] for r in sizes])
            ba, bb = fit([figures[r][name][op][1] for r in sizes])
            table[name][op] = (fa, fb, ba, bb)
    return RowCosts(table, peak_flops, hbm_bandwidth, source=source)


@dataclass(frozen=True)
class MicrobatchChoice:
    """One microbatch count ``plan_microbatches`` simulated: ``rows`` per microbatch, the runtime placement's
    simulated step time (``runtime_time``, ppermutes included) under ``schedule``, whether it fits the memory
    budget, its peak per-device memory, and the per-tick cost it was priced with."""

    microbatches: int
    rows: int
    runtime_time: float
    fits_memory: bool
    peak_memory: float
    schedule: str
    tick_seconds: float


def divisors(n: int) -> tuple:
    if n < 1:
        raise ValueError(f"divisors of a positive integer; got {n}")
    return tuple(d for d in range(1, n + 1) if n % d == 0)


def tick_seconds_for(boundary_bytes: float, *, link_bandwidth: float, link_latency: float) -> float:
    """One tick's ppermutes: each stage sends one activation forward and one cotangent back (opposite directions of
    a link, at once), ``boundary_bytes`` each: latency + bytes / one direction's bandwidth."""
    if not (link_bandwidth > 0 and link_latency >= 0):
        raise ValueError(f"link_bandwidth must be > 0 and link_latency >= 0; got {link_bandwidth!r}, "
                         f"{link_latency!r}")
    return link_latency + boundary_bytes / link_bandwidth


def plan_microbatches(costs_at, parallel: ParallelConfig, *, rows: int, row_costs: RowCosts,
                      link_bandwidth: float = INF, link_latency: float = 0.0, candidates=None,
                      memory_budget: float = INF, **plan_kw) -> PipelinePlan:
    """Choose the microbatch count with the stages and the schedule: for a fixed batch of ``rows`` rows per pipeline
    replica, every M in ``candidates`` (default: the divisors of ``rows``, the counts the train step accepts) is
    planned (``plan_pipeline``) on microbatches of rows / M rows, and the plan whose runtime placement (what
    train.pipelined_step runs) has the least simulated step time within ``memory_budget`` is returned (the least
    over budget when none fits; ties: the fewer microbatches). Its ``microbatch_choices`` lists every M tried.

    What moves with M: each op's time is the roofline of FLOPs and bytes affine in the rows (``row_costs.at``), so
    more, smaller microbatches shrink the pipeline's fill and drain but pay each op's fixed part (the weights read
    again) and each tick's ppermutes (``tick_seconds_for``: the boundary activation of rows / M rows over one
    direction of a link, ``link_bandwidth`` bytes/s, plus ``link_latency`` s) more often; the activations a stage
    holds (its schedule's slots x one microbatch's saved inputs) shrink. ``costs_at(r)``: the model's PipelineCosts
    for microbatches of ``r`` rows (e.g. ``lambda r: pipeline_costs(config, text_tokens=..., microbatch_size=r)``),
    whose layer names are ``row_costs``'; ``plan_kw``: plan_pipeline's other options. Times are seconds on the
    chip of ``row_costs``."""
    if rows < 1:
        raise ValueError(f"rows must be >= 1; got {rows}")
    cands = divisors(rows) if candidates is None else tuple(int(m) for m in candidates)
    if candidates is None and (plan_kw.get("schedule") or parallel.pipeline_schedule) == "interleaved":
        cands = tuple(m for m in cands if m % parallel.pipeline == 0)  # it takes microbatches in groups of S
        if not cands:
            raise ValueError(f"interleaved takes the microbatches in groups of ParallelConfig.pipeline="
                             f"{parallel.pipeline}: no multiple of it divides the {rows} rows per pipeline replica")
    bad = [m for m in cands if m < 1 or rows % m]
    if bad or not cands:
        raise ValueError(f"microbatch candidates must divide rows={rows}; got {list(cands)}")
    for k in ("layer_costs", "device_flops", "tick_seconds"):
        if k in plan_kw:
            raise ValueError(f"plan_microbatches sets {k} itself (from row_costs and the link); got {k}=")
    best, choices = None, []
    for M in cands:
        r = rows // M
        costs = costs_at(r)
        tick = 0.0 if link_bandwidth == INF and link_latency == 0 else tick_seconds_for(
            costs.runtime.llm[0].layer.io_bytes, link_bandwidth=link_bandwidth, link_latency=link_latency)
        plan = plan_pipeline(costs, dataclasses.replace(parallel, microbatches=M), memory_budget=memory_budget,
                             device_flops=row_costs.peak_flops, layer_costs=row_costs.at(r), tick_seconds=tick,
                             **plan_kw)
        p = plan.runtime
        choices.append(MicrobatchChoice(M, r, p.runtime_time, p.fits_memory, max(p.stage_memory), p.schedule, tick))
        key = (not p.fits_memory, p.runtime_time * (1 + 1e-12), M)
        if best is None or key < best[0]:
            best = (key, plan)
    return dataclasses.replace(best[1], microbatch_choices=tuple(choices))


def _outside_placements(costs: PipelineCosts, stages, rt_args, tick_seconds: float = 0.0,
                        interleaved_chunks: int = 2, in_flight: int | None = None, encoders: str = "outside") -> tuple:
    """Encoders outside the pipeline: (the min-max split on the common yardstick (the 1F1B formula), the uniform
    split, the split with the least lockstep step time as parallel.pipeline runs it, that search). The runtime
    split is searched under each schedule asked for (every planned one for "auto"), those with several chunks per
    device over S x V virtual stages (``interleaved_chunks``: V of "interleaved"; ``in_flight``: zb_v's admitted
    microbatches); each one-chunk schedule's placement compared with its encodes in the bubbles where ``encoders``
    (``ParallelConfig.pipeline_encoders``) allows them (``with_bubble_encodes``: schedules idle differently)."""
    aware, runtime = costs.aware, costs.runtime
    M, tensor, device_flops, memory_budget = rt_args[:4]
    schedule = rt_args[-1]
    comm = _comm(tick_seconds)
    comm = Comm(comm.tick_seconds * tensor * device_flops, comm.overlap)  # in the searches' unit: FLOPs
    ends = dict(first_extra=[aware.embed], last_extra=[aware.head])
    counts = min_max_split(aware.llm, stages, microbatches=M, memory_budget=memory_budget, tensor=tensor, **ends)
    if counts is None:  # nothing fits: report the unconstrained split (flagged as not fitting)
        counts = min_max_split(aware.llm, stages, microbatches=M, **ends)
    outside = _evaluate_outside("ours:outside", aware, counts, *rt_args, tick_seconds)
    uniform = _evaluate_outside("uniform", aware, uniform_split(len(aware.llm), stages), *rt_args, tick_seconds)
    best = None
    for kind in (ONE_CHUNK_PLANNED if schedule == "auto" else (schedule,) if schedule not in VIRTUAL_SCHEDULES
                 else ()):
        search = lockstep_split(runtime.llm, stages, microbatches=M, head=runtime.head, memory_budget=memory_budget,
                                tensor=tensor, schedule=kind, comm=comm)
        if search.counts is None:  # nothing fits: report the unconstrained split (flagged as not fitting)
            search = lockstep_split(runtime.llm, stages, microbatches=M, head=runtime.head, tensor=tensor,
                                    schedule=kind, comm=comm)
        placed = _evaluate_outside("ours:runtime", aware, search.counts, *rt_args[:-1], kind, tick_seconds)
        placed = with_bubble_encodes(placed, costs, M, stages, tensor, device_flops, comm, encoders, memory_budget)
        best = _better(best, placed, search)
    # Encodes asked for in the bubbles ("bubbles") can only run on a one-chunk table: "auto" then chooses among those.
    bubbles = encoders == "bubbles" and encoders_frozen(runtime)
    for kind in (VIRTUAL_SCHEDULES if schedule == "auto" and not bubbles
                 else (schedule,) if schedule in VIRTUAL_SCHEDULES else ()):
        V = virtual_stages_of(kind, interleaved_chunks if kind == "interleaved" else None)
        usable = len(runtime.llm) >= stages * V and (kind != "interleaved" or M % stages == 0)
        if not usable and schedule == "auto":
            continue
        if not usable:
            raise ValueError(f"schedule {kind!r} needs >= {stages * V} LLM layers (got {len(runtime.llm)})"
                             + (f" and microbatches a multiple of {stages} (got {M})" if kind == "interleaved" else ""))
        n = in_flight if kind == "zb_v" else None
        search = virtual_split(runtime.llm, stages, microbatches=M, head=runtime.head, kind=kind, virtual_stages=V,
                               memory_budget=memory_budget, tensor=tensor, max_in_flight=n, comm=comm)
        placed = _evaluate_virtual("ours:runtime", aware, search.counts, kind, V, *rt_args[:-1], tick_seconds, n)
        best = _better(best, placed, search)
    return outside, uniform, best[0], best[1]


def _better(best: tuple | None, placed: Placement, search) -> tuple:
    """(placement, its search): ``placed`` where it beats ``best``'s placement, fitting the memory budget first (each
    schedule holds its own number of microbatches), then the faster (an earlier one kept on a tie)."""
    if best is None or (not placed.fits_memory, placed.runtime_time) < (not best[0].fits_memory,
                                                                      best[0].runtime_time * (1 - 1e-12)):
        return placed, search
    return best


def virtual_split(chain, stages: int, *, microbatches: int, head: CostedLayer | None = None, kind: str,
                  virtual_stages: int | None = None, memory_budget: float = INF, tensor: int = 1,
                  layer_ops: dict | None = None, max_in_flight: int | None = None,
                  comm: Comm | None = None) -> LockstepSplit:
    """The contiguous split of ``chain`` into the S x V virtual stages of ``kind`` ("interleaved", "zb_v") with the
    least simulated step time under ``kind``'s table, within ``memory_budget`` per device (``virtual_memory``):
    from the min-max split of the runtime's op totals and the uniform one, single-boundary moves while the time
    improves (local: ``exhaustive`` False). ``comm``: the ticks' ppermutes (in the unit of the costs), overlapped
    or not, as the table is then run and priced."""
    comm = comm if comm is not None else Comm()
    V = virtual_stages_of(kind, virtual_stages)
    K = stages * V
    if len(chain) < K:
        raise ValueError(f"cannot split {len(chain)} layers into {K} virtual stages ({stages} x {V})")
    ops = runtime_layer_ops(chain) if layer_ops is None else {k: np.asarray(v, np.float64)
                                                            for k, v in layer_ops.items()}
    head_c = runtime_head_cost(head) if head is not None else 0.0
    total = {id(c): float(v) for c, v in zip(chain, ops["f"] + ops["bw"])}
    if head is not None:
        total[id(head)] = head_c
    dp = min_max_split(chain, K, last_extra=[head] if head is not None else (), cost=lambda c: total[id(c)])
    evaluated = [0]

    def time_of(counts):
        evaluated[0] += 1
        return simulate(stage_ops(ops, counts, head_c), microbatches, kind, V, max_in_flight, comm.overlap,
                        comm.tick_seconds).time

    def fits(counts):
        sched = schedule_for(stage_ops(ops, counts, head_c), microbatches, kind, V, max_in_flight, comm.overlap)
        return max(virtual_memory(chain, head, counts, kind, V, sched.peak_act, tensor)) <= memory_budget

    found = [_climb_counts(start, time_of, fits)[:2] for start in {tuple(dp), uniform_split(len(chain), K)}
             if fits(start)]
    dp_time = time_of(tuple(dp))
    if not found:  # nothing fits: the unconstrained min-max split, flagged by the caller's memory check
        return LockstepSplit(tuple(dp), dp_time, tuple(dp), dp_time, evaluated[0], False)
    t, counts = min(found)
    return LockstepSplit(counts, t, tuple(dp), dp_time, evaluated[0], False)


def virtual_memory(chain, head, counts, kind: str, virtual_stages: int, peak_act, tensor: int = 1) -> tuple:
    """Bytes per device of a virtual-stage split: its chunks' parameters and optimizer state (every layer's, where
    the layers are stored replicated: ``stored_fixed``), the head's on the device of the last virtual stage, and its
    schedule's peak live activation slots (``peak_act``, one per device) of the largest chunk's saved inputs (the
    runtime's pool has one shape on every device). Stored in blocks, the layers move to their chunks by rows
    (``pipeline.split_moves`` / ``block_moves``): no device holds a copy of the others'."""
    pieces = split_chain(chain, counts)
    S = len(peak_act)
    place = virtual_placement(kind, S, virtual_stages)
    act = max(sum(c.act_bytes for c in p) + (head.act_bytes if head is not None and k == len(pieces) - 1 else 0.0)
              for k, p in enumerate(pieces))
    head_fixed = stage_memory([head], in_flight=0, tensor=tensor)["total"] if head is not None else 0.0
    out = []
    for d in range(S):
        mine = np.flatnonzero(place[:, 0] == d)
        fixed = stored_fixed(chain, [c for k in mine for c in pieces[k]], S, tensor)
        out.append(fixed + (head_fixed if len(pieces) - 1 in mine else 0.0) + peak_act[d] * act / tensor)
    return tuple(out)


def _evaluate_virtual(name, costs: ModelCosts, counts, kind, V, M, tensor, device_flops, budget, stages,
                      runtime_costs: ModelCosts, tick_seconds: float = 0.0,
                      max_in_flight: int | None = None) -> Placement:
    """A placement over S x V virtual stages (encoders outside), priced as ``_evaluate_outside`` prices one stage per
    device: ``llm_stage_layers`` and the stage costs are per virtual stage in the model's order, the memory per
    device; 1F1B's time and bubble (``runtime_time_1f1b``) are those of the same layers with every V consecutive
    virtual stages one stage. ``predicted_time``: the asynchronous formula on each device's summed chunks."""
    stage_c = tuple(_seconds(sum(c.total for c in p), tensor, device_flops) for p in _llm_pieces(costs, counts))
    place = virtual_placement(kind, stages, V)
    per_device = [sum(stage_c[k] for k in np.flatnonzero(place[:, 0] == d)) for d in range(stages)]
    enc_time, enc_mem = _encoders_outside(costs, M, stages, tensor, device_flops)
    rt = runtime_costs
    ops = _ops_in_seconds(rt, counts, tensor, device_flops)
    comm = _comm(tick_seconds)
    sim = simulate(ops, M, kind, V, max_in_flight, comm.overlap, comm.tick_seconds)
    merged = tuple(sum(counts[i * V:(i + 1) * V]) for i in range(stages))
    one = simulate(_ops_in_seconds(rt, merged, tensor, device_flops), M, "1f1b", overlap=comm.overlap,
                   tick_seconds=comm.tick_seconds)
    mem = tuple(m + enc_mem for m in virtual_memory(rt.llm, rt.head, counts, kind, V, sim.schedule.peak_act, tensor))
    return Placement(
        name, True, tuple(counts), {}, stage_c, {}, enc_time, enc_time + pipeline_time(per_device, M), mem,
        max(mem) <= budget, enc_time + sim.time, (ops.f, ops.bw), kind, sim.bubble_fraction, enc_time + one.time,
        one.bubble_fraction,
    )


def _feasible_allocations(costs: ModelCosts, stages):
    """Stage allocations (each module >= 1 stage, no module more stages than layers) summing to ``stages``."""
    enc_names = list(costs.encoders)
    for alloc in _stage_allocations(stages, enc_names):
        if alloc["llm"] <= len(costs.llm) and all(alloc[e] <= len(costs.encoders[e]) for e in enc_names):
            yield alloc


def _best_own_stages(costs: PipelineCosts, stages, args, schedule="auto", tick_seconds=0.0) -> Placement | None:
    """Encoders on their own stages: the best allocation (fitting memory first, then the fastest); None without
    encoders or with too few stages."""
    aware = costs.aware
    if not aware.encoders or stages <= len(aware.encoders):
        return None
    best = None
    for alloc in _feasible_allocations(aware, stages):
        p = _own_stage_placement("ours:own_stages", aware, alloc, *args, runtime=costs.runtime, schedule=schedule,
                                 tick_seconds=tick_seconds)
        if best is None or (p.fits_memory, -p.predicted_time) > (best.fits_memory, -best.predicted_time):
            best = p
    return best


def _baselines(costs: PipelineCosts, stages, args, rt_args, cornstarch_stages, megatron_stages,
               tick_seconds=0.0) -> tuple:
    """(Cornstarch's placement: encoders on their own stages, Megatron-like: a frozen-unaware planner's split), both
    evaluated on the frozen-aware costs; Cornstarch's is None without encoders or with too few stages."""
    aware, unaware = costs.aware, costs.unaware
    enc_names = list(aware.encoders)
    if not enc_names:
        # Text-only: the frozen-unaware baseline balances layers by its own costs on the one pipeline.
        counts = min_max_split(unaware.llm, stages, microbatches=args[0], first_extra=[unaware.embed],
                               last_extra=[unaware.head])
        return None, _evaluate_outside("megatron_like", aware, counts, *rt_args, tick_seconds)
    if stages <= len(enc_names):
        return None, None
    cs = cornstarch_stages or {"llm": stages - len(enc_names), **{e: 1 for e in enc_names}}
    _check_alloc(cs, enc_names, stages, "cornstarch_stages")
    cornstarch = _own_stage_placement("cornstarch", aware, cs, *args, runtime=costs.runtime, schedule=rt_args[-1],
                                      tick_seconds=tick_seconds)
    if megatron_stages is None:
        # A frozen-unaware planner picks the allocation that looks best on its own cost model.
        best_ref = None
        for alloc in _feasible_allocations(aware, stages):
            ref = _own_stage_placement("ref", unaware, alloc, *args)
            if best_ref is None or ref.predicted_time < best_ref[0]:
                best_ref = (ref.predicted_time, alloc)
        megatron_stages = best_ref[1]
    _check_alloc(megatron_stages, enc_names, stages, "megatron_stages")
    return cornstarch, _own_stage_placement("megatron_like", aware, megatron_stages, *args, unaware=unaware,
                                            runtime=costs.runtime, schedule=rt_args[-1], tick_seconds=tick_seconds)


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
    if p.runtime_time is not None and p.runtime_stage_ops is not None:
        F, B = p.runtime_stage_ops
        lines.append(
            f"    runtime (lockstep 1F1B ticks): {p.runtime_time_1f1b:.4g} {unit}, forward op "
            f"{[float(f'{c:.4g}') for c in F]}, backward op {[float(f'{c:.4g}') for c in B]}"
        )
    if p.runtime_time is not None:
        lines.append(f"    runtime schedule {p.schedule}: {p.runtime_time:.4g} {unit} simulated, bubble fraction "
                     f"{p.bubble_fraction:.3f} (1F1B: {p.bubble_fraction_1f1b:.3f})")
    if p.encoders_in_bubbles:
        lines.append(f"    encoders in the bubbles: {p.encoders_in_bubbles} microbatches' encodes in idle warm-up "
                     f"ticks, the others' before the pipeline")
    if p.slicing is not None:
        units = lambda v: sorted({u for stage in v for u in stage})  # noqa: E731
        lines.append(f"    slices: ticks of {p.slicing.budget} units (a layer's forward {units(p.slicing.forward_units)}"
                     f", backward {units(p.slicing.backward_units)} units)")
    lines.append(f"    memory per stage (GiB) {[round(m / 2**30, 3) for m in p.stage_memory]}")
    return lines


def format_plan(plan: PipelinePlan) -> str:
    """Human-readable plan for ``train.py --dry_run``."""
    unit = "FLOP" if plan.device_flops == 1.0 else "s"
    budget = "none" if plan.memory_budget == INF else f"{plan.memory_budget / 2**30:.2f} GiB"
    lines = [
        f"pipeline plan: {plan.stages} stages, {plan.microbatches} microbatches, tensor {plan.tensor}, "
        f"memory budget {budget}, per-layer costs {plan.cost_source}",
        "chosen:",
        *_fmt_placement(plan.chosen, unit),
        "compared on the same cost model:",
    ]
    for p in (plan.runtime, plan.uniform, plan.cornstarch, plan.megatron_like, *plan.alternatives):
        if p is not None and p is not plan.chosen:
            lines += _fmt_placement(p, unit)
    return "\n".join(lines + format_microbatch_choices(plan))


def format_microbatch_choices(plan: PipelinePlan) -> list:
    """``plan_microbatches``' choice and every count it simulated, one line each (empty for a plan at a given M)."""
    if not plan.microbatch_choices:
        return []
    unit = "FLOP" if plan.device_flops == 1.0 else "s"
    lines = [f"microbatches chosen: {plan.microbatches} (the least simulated step time of the runtime placement "
             f"within the memory budget; per-layer costs {plan.cost_source})"]
    for c in plan.microbatch_choices:
        lines.append(f"  M={c.microbatches:<4d} {c.rows} rows each: {c.runtime_time:.4g} {unit} ({c.schedule}, "
                     f"peak {c.peak_memory / 2**30:.3f} GiB{'' if c.fits_memory else ', OVER MEMORY BUDGET'}, "
                     f"tick {c.tick_seconds:.3g} {unit})")
    return lines
