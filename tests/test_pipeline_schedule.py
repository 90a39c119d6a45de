"""Schedules as the runtime runs them: the simulator's tick table against the instrumented runtime, split backward
(B / W) by compiled FLOPs, ZB-H1 against one device and against 1F1B's memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mllm_jax.parallel.cost_model import Layer, cost_chain
from mllm_jax.parallel.pipeline import (TRACE_FIELDS, ParamSplit, layer_grads, layout_schedule, layout_slicing,
                                        make_layout, pipeline_value_and_grad)
from mllm_jax.parallel.pipeline_plan import runtime_stage_ops
from mllm_jax.parallel.schedule import (OP_B, OP_BW, OP_F, OP_FB, OP_W, StageOps, build_schedule, default_slicing,
                                        one_f_one_b_peak, paired_peak, simulate, tick_costs)
from test_pipeline import check_equal, layer_fn, loss_fn, pipeline_mesh, problem, replay

# ----------------------------------------------------------------------------------------------------------------
# Tables.


@pytest.mark.parametrize("stages,M", [(2, 1), (2, 5), (3, 2), (4, 8), (5, 16)])
def test_zb_h1_table_keeps_dependencies_and_1f1b_memory(stages, M):
    base = build_schedule(stages, M)
    zb = build_schedule(stages, M, kind="zb_h1")
    peak = replay(zb, stages, M)  # every read finds its microbatch; everything is consumed
    assert tuple(peak) == zb.peak_act
    # The same activation pool as 1F1B (every device's buffer is the largest stage's: SPMD).
    assert zb.act_slots == base.act_slots == one_f_one_b_peak(0, stages, M)
    ops, mbs = zb.ops, zb.column("mb")
    when = {(int(o), s, int(m)): t for t in range(ops.shape[0]) for s in range(stages)
            for o, m in [(ops[t, s], mbs[t, s])] if o != 0}
    for s in range(stages):
        for m in range(M):
            if (OP_B, s, m) in when:  # split: its W comes later, and only after the stage's last forward
                assert when[(OP_W, s, m)] > when[(OP_B, s, m)] > when[(OP_F, s, M - 1)]
                assert (OP_BW, s, m) not in when
            else:
                assert (OP_BW, s, m) in when and (OP_W, s, m) not in when
    if stages > 1 and M > 1:
        assert (ops == OP_W).any()


def test_simulator_reproduces_the_issues_lockstep_numbers():
    # Forward : backward = 1 : 3 (remat), 4 stages, 24 microbatches: the 1F1B table takes 154 units in lockstep
    # (the asynchronous formula says 108, the ideal 96). Bubble fraction = 1 - work / (stages x time).
    ops = StageOps(f=(1.0,) * 4, b=(2.0,) * 4, w=(1.0,) * 4, bw=(3.0,) * 4)
    one = simulate(ops, 24, "1f1b")
    assert one.time == 154.0 and one.ticks == 2 * (24 + 4 - 1)
    assert one.bubble_fraction == pytest.approx(1 - 4 * 24 * 4 / (4 * 154))
    zb = simulate(ops, 24, "zb_h1")
    assert zb.time < one.time and zb.bubble_fraction < one.bubble_fraction
    # Pairing a forward and a backward in each tick: the asynchronous formula's 108, at about twice the memory.
    fb = simulate(ops, 24, "1f1b_fb")
    assert fb.time == (24 - 1) * 4 + 4 * 4 and fb.bubble_fraction == pytest.approx(1 - 96 / 108)
    assert fb.schedule.act_slots == 2 * 4 - 1
    # No weight gradient anywhere (a frozen LLM under trainable projectors): ZB-H1 is 1F1B.
    frozen = StageOps(f=(1.0,) * 4, b=(2.0,) * 4, w=(0.0,) * 4, bw=(2.0,) * 4)
    assert (simulate(frozen, 8, "zb_h1").schedule.ops == simulate(frozen, 8, "1f1b").schedule.ops).all()


@pytest.mark.parametrize("stages,M,layers,budget,overlap,frozen_prefix", [
    (2, 3, (2, 3), 2, False, False), (4, 8, (3, 2, 4, 3), 1, False, False), (4, 8, (3, 2, 4, 3), 3, False, True),
    (5, 16, (4, 4, 5, 5, 3), 2, True, False), (5, 16, (4, 4, 5, 5, 3), 6, True, True), (3, 2, (5, 1, 2), 4, False,
                                                                                           False)])
def test_sliced_table_keeps_dependencies_and_1f1b_memory(stages, M, layers, budget, overlap, frozen_prefix):
    bw = [not frozen_prefix] + [True] * (stages - 1)
    sl = default_slicing(layers, bw, budget)
    sched = build_schedule(stages, M, kind="1f1b_sliced", slicing=sl, overlap=overlap, backward_stages=bw)
    # Every read finds its microbatch, slices continue where the last one ended and cover every layer.
    assert tuple(replay(sched, stages, M)) == sched.peak_act
    one = build_schedule(stages, M, overlap=overlap, backward_stages=bw)
    assert all(a <= b for a, b in zip(sched.peak_act, one.peak_act)) and sched.act_slots <= one.act_slots
    # No tick holds more than the budget, unless one layer's op alone does.
    fw = [np.concatenate([[0], np.cumsum(v)]) for v in sl.forward_units]
    bu = [np.concatenate([[0], np.cumsum(v)]) for v in sl.backward_units]
    col = {n: sched.column(n) for n in ("op", "f_lo", "f_hi", "b_lo", "b_hi")}
    for t, s in zip(*np.nonzero(col["op"] != 0)):
        units = layers_run = 0
        if col["op"][t, s] in (OP_F, OP_FB):
            units += fw[s][col["f_hi"][t, s]] - fw[s][col["f_lo"][t, s]]
            layers_run += col["f_hi"][t, s] - col["f_lo"][t, s]
        if col["op"][t, s] in (OP_BW, OP_FB):
            units += bu[s][col["b_hi"][t, s]] - bu[s][col["b_lo"][t, s]]
            layers_run += col["b_hi"][t, s] - col["b_lo"][t, s]
        assert units <= budget or layers_run == 1


def test_sliced_ticks_cost_alike_where_1f1b_pays_the_backward_twice():
    """Frozen layers (backward = 2 forwards): 1F1B's lockstep steady state costs 2 BW per microbatch, sliced ticks of
    one backward layer about F + BW; the simulated time falls towards the asynchronous formula, at 1F1B's memory."""
    S, M, L = 4, 16, 4
    ops = StageOps(f=(L * 1.0,) * S, b=(L * 2.0,) * S, w=(0.0,) * S, bw=(L * 2.0,) * S,
                   f_layers=((1.0,) * L,) * S, bw_layers=((2.0,) * L,) * S)
    one, sliced, paired = (simulate(ops, M, k) for k in ("1f1b", "1f1b_sliced", "1f1b_fb"))
    formula = (M - 1) * 3 * L + S * 3 * L  # (M - 1) x a stage's F + BW, + one microbatch through all stages
    assert one.time >= 2 * (2 * L) * M  # every microbatch: two ticks that each cost BW
    assert sliced.time == formula == paired.time  # 1F1B-FB's time ...
    assert sliced.schedule.act_slots == one.schedule.act_slots == S < paired.schedule.act_slots  # ... in 1F1B's memory
    assert sliced.bubble_fraction < one.bubble_fraction


@pytest.mark.parametrize("stages,M", [(2, 3), (4, 8), (5, 16)])
def test_paired_table_keeps_dependencies_and_its_memory(stages, M):
    sched = build_schedule(stages, M, kind="1f1b_fb")
    assert tuple(replay(sched, stages, M)) == sched.peak_act  # every read finds its microbatch
    assert sched.peak_act == tuple(paired_peak(s, stages, M) for s in range(stages))
    ops = sched.ops
    # Each stage runs M forwards and M backwards, each once, in order; steady state pairs them in one tick.
    for s in range(stages):
        fwd = [m for t in range(ops.shape[0]) for m in [sched.column("mb")[t, s]] if ops[t, s] in (OP_F, OP_FB)]
        bwd = [m for t in range(ops.shape[0]) for m in
               [sched.column("mb2")[t, s] if ops[t, s] == OP_FB else sched.column("mb")[t, s]]
               if ops[t, s] in (OP_BW, OP_FB)]
        assert fwd == list(range(M)) and bwd == list(range(M))
    assert ops.shape[0] == M + 2 * (stages - 1)  # the round trip once, then one microbatch a tick
    # A frozen prefix (stage 0 without backward) is paced by the free slots of the next stage.
    frozen = build_schedule(stages, M, kind="1f1b_fb", backward_stages=[False] + [True] * (stages - 1))
    replay(frozen, stages, M)
    assert frozen.peak_act[0] == 0 and max(frozen.peak_act) <= max(sched.peak_act)


@pytest.mark.parametrize("stages,M", [(1, 3), (2, 2), (2, 5), (3, 6), (4, 8), (4, 3), (5, 10)])
def test_virtual_stage_tables_keep_dependencies_and_their_memory(stages, M):
    """Interleaved (Megatron's ring of chunks) and zb_v (the V): every read finds its (virtual stage, microbatch),
    every message arrives where the table stores it; zb_v holds at most 2 chunk inputs per microbatch in flight
    on any device: 2 x min(S, M) slots of half a stage, 1F1B's activation memory."""
    K = 2 * stages
    for weights in (True, False):
        zb = build_schedule(stages, M, kind="zb_v", weight_stages=[weights] * K)
        assert tuple(replay(zb)) == zb.peak_act
        assert zb.act_slots <= 2 * one_f_one_b_peak(0, stages, M)
        assert zb.virtual_stages == 2 and ((zb.ops == OP_W).any() == (weights and stages * M > 1))
        # The V: virtual stage k < S on device k, then back; the loss (the last virtual stage) on device 0.
        k, d = zb.column("virtual"), np.arange(stages)[None, :]
        busy = zb.ops != 0
        assert (np.where(k < stages, k, 2 * stages - 1 - k) == d)[busy].all()
        assert (zb.column("recv_xo_slot") >= 0).sum() == (M if stages > 1 else M)  # one turn per microbatch
        lagged = build_schedule(stages, M, kind="zb_v", weight_stages=[weights] * K, overlap=True)
        assert tuple(replay(lagged)) == lagged.peak_act
        assert lagged.ops.shape[0] >= zb.ops.shape[0]  # neighbours' results arrive a tick later
    for kind in ("1f1b", "zb_h1", "1f1b_fb", "gpipe"):
        lagged = build_schedule(stages, M, kind=kind, overlap=True)
        assert tuple(replay(lagged)) == lagged.peak_act
        # A message crosses one link per tick and is read a tick later: F of microbatch 0 reaches the last stage
        # at tick 2 (S - 1), not S - 1.
        first_f = [int(np.flatnonzero(lagged.ops[:, d] != 0)[0]) for d in range(stages)]
        assert first_f == [2 * d for d in range(stages)]
    if M % stages == 0:
        for V in (2, 3):
            il = build_schedule(stages, M, kind="interleaved", virtual_stages=V)
            assert tuple(replay(il)) == il.peak_act
            il = build_schedule(stages, M, kind="interleaved", virtual_stages=V, overlap=True)
            assert tuple(replay(il)) == il.peak_act
            assert ((il.column("virtual") % stages == np.arange(stages)[None, :]) | (il.ops == 0)).all()
    else:
        with pytest.raises(ValueError, match="multiple of"):
            build_schedule(stages, M, kind="interleaved")
    with pytest.raises(ValueError, match="one chunk per device"):
        build_schedule(stages, M, kind="zb_h1", virtual_stages=2)


def test_zb_v_bubble_is_below_1f1b_at_1f1b_memory():
    """A frozen LLM (no W): ZB-H1 is 1F1B, but the V's shorter round trips and half-stage chunks fill the
    warm-up and cool-down; trainable layers: ZB-V below ZB-H1. Same activation memory: S stage inputs per device
    (1F1B: S slots of a stage; zb_v: 2 S slots of half a stage)."""
    S, M = 4, 8
    for w in (0.0, 1.0):
        whole = StageOps(f=(1.0,) * S, b=(2.0,) * S, w=(w,) * S, bw=(2.0 + w,) * S)
        half = StageOps(f=(0.5,) * 2 * S, b=(1.0,) * 2 * S, w=(w / 2,) * 2 * S, bw=((2.0 + w) / 2,) * 2 * S)
        one, zb1, v = simulate(whole, M, "1f1b"), simulate(whole, M, "zb_h1"), simulate(half, M, "zb_v")
        assert v.schedule.act_slots == 2 * one.schedule.act_slots
        assert v.bubble_fraction < zb1.bubble_fraction <= one.bubble_fraction
        assert v.time < zb1.time
    assert simulate(half, M, "interleaved").time < one.time  # the ring, at more memory


# ----------------------------------------------------------------------------------------------------------------
# The simulator's tick table is the runtime's: the runtime counts what each stage ran in each tick.


def unit_chain(trainable):
    """One unit-cost GEMM layer per entry (f = dX = dW = 1): the planner's costs count layer passes."""
    layers = [Layer(name=str(i), module="m", weight_flops=1.0, trainable=bool(t)) for i, t in enumerate(trainable)]
    return cost_chain(layers, remat=True)[0]


@pytest.mark.parametrize("schedule", ["1f1b", "zb_h1", "1f1b_fb", "1f1b_sliced", "interleaved", "zb_v",
                                      "zb_v+overlap", "1f1b_sliced+overlap"])
def test_simulator_tick_table_equals_the_instrumented_runtime(schedule):
    schedule, overlap = schedule.split("+")[0], schedule.endswith("+overlap")
    stage_layers, trainable, M = (1, 3, 2, 1), [0, 0, 1, 0, 1, 1, 0], 5
    if schedule in ("interleaved", "zb_v"):  # two chunks per device: 8 virtual stages
        stage_layers, trainable, M = (1, 1, 2, 1, 1, 2, 1, 1), [0, 0, 1, 0, 1, 1, 0, 1, 0, 1], 4
    mesh = pipeline_mesh((4,), ("pipeline",))
    params, lp, x, aux = problem(sum(stage_layers), M)
    # The planner's per-stage op costs of the same split (unit layers): the work of a tick in layer passes.
    ops = runtime_stage_ops(unit_chain(trainable), stage_layers)
    sim = simulate(ops, M, schedule, overlap=overlap)  # "1f1b_sliced": the planner's slicing, run as it chose it

    def run(p, lp, x, aux):
        return pipeline_value_and_grad(layer_fn, p, x, loss_fn=loss_fn, loss_params=lp, aux=aux,
                                       stage_layers=stage_layers, mesh=mesh,
                                       trainable_layers=np.asarray(trainable, bool), schedule=schedule, trace=True,
                                       overlap=overlap, slicing=sim.schedule.slicing)

    with jax.set_mesh(mesh):
        *_, counts = jax.jit(run)(params, lp, x, aux)
    counts = np.asarray(counts)  # [ticks, stages, TRACE_FIELDS]
    layout = make_layout(stage_layers, np.asarray(trainable, bool), schedule=schedule)
    assert (sim.schedule.table == layout_schedule(layout, M, schedule, overlap=overlap,
                                                  slicing=sim.schedule.slicing).table).all()
    assert counts.shape == (sim.ticks, 4, len(TRACE_FIELDS))
    ran = counts.sum(axis=2)  # forwards + remat recomputes + dX + dW, each one unit
    np.testing.assert_array_equal(ran, tick_costs(sim.schedule, ops))
    assert sim.time == ran.max(axis=1).sum()
    if schedule == "zb_h1":
        assert (sim.schedule.ops == OP_W).any()
    if schedule == "1f1b_fb":
        assert (sim.schedule.ops == OP_FB).any()
    if schedule == "zb_v":
        assert (sim.schedule.ops == OP_W).any()
    # The frozen prefix (virtual stages 0 and 1 on devices 0 and 1, or stage 0) never ran a backward.
    frozen = sim.schedule.column("virtual") < (2 if schedule in ("interleaved", "zb_v") else 1)
    assert (counts[..., 1:].sum(axis=2)[frozen] == 0).all()


# ----------------------------------------------------------------------------------------------------------------
# Split backward: compiled FLOPs.


def compiled_flops(f, *args) -> float:
    ca = jax.jit(f).lower(*args).compile().cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    return float(ca.get("flops", 0.0))


def test_split_backward_computes_no_dw_for_frozen_weights_by_compiled_flops():
    # A LoRA'd linear layer: y = x W + (x A) B. Base W frozen, adapters A, B trainable.
    mb, d, r = 64, 128, 4
    gemm, lora_gemm = 2 * mb * d * d, 2 * mb * d * r

    def layer(p, h, aux):
        return h @ p["w"] + (h @ p["a"]) @ p["b"]

    p = {"w": jnp.zeros((d, d)), "a": jnp.zeros((d, r)), "b": jnp.zeros((r, d))}
    x, g = jnp.zeros((mb, d)), jnp.zeros((mb, d))
    adapters = ParamSplit(p, {"w": False, "a": True, "b": True})

    def flops(dx, dw, split=None):
        return compiled_flops(lambda p, x, g: layer_grads(layer, p, x, g, None, dx=dx, dw=dw, split=split), p, x, g)

    # B: dX = g W^T + (g B^T) A^T (and the add of the two), no weight gradient at all.
    assert flops(True, False) == gemm + 2 * lora_gemm + mb * d
    # W of the adapters only: x A (recomputed), dB = (x A)^T g, g B^T, dA = x^T (g B^T); no dW of the base weight.
    assert flops(False, True, adapters) == 4 * lora_gemm
    # W of every weight: the base weight's dW = x^T g on top.
    assert flops(False, True) == gemm + 4 * lora_gemm
    # Fused (1F1B's BW) = B + W minus the shared recompute of x A.
    assert flops(True, True, adapters) == gemm + 5 * lora_gemm + mb * d
    assert flops(False, False) == 0.0


def test_frozen_stack_carries_no_gradient_buffer():
    # Every layer frozen, the input trains (projectors): the pipeline carries no weight-gradient accumulator, so its
    # compiled temporaries and outputs shrink by at least the stacked weights' size against the same stack trainable.
    mesh = pipeline_mesh((2,), ("pipeline",))
    n, width, M = 4, 256, 2
    params = {"w": jnp.zeros((n, width, width)), "b": jnp.zeros((n, width))}
    lp, aux = {"v": jnp.zeros((width, 3))}, {"scale": jnp.zeros((M,)), "target": jnp.zeros((M, 2, 3))}
    x = jnp.zeros((M, 2, width))

    def temp(trainable):
        def run(p, lp, x, aux):
            loss, (g, glp, gx) = pipeline_value_and_grad(
                layer_fn, p, x, loss_fn=loss_fn, loss_params=lp, aux=aux, stage_layers=(2, 2), mesh=mesh,
                trainable_layers=np.full(n, trainable), input_requires_grad=True)
            # The caller keeps no layer gradient of a frozen LLM, and keeps a trainable one's: else XLA drops the
            # accumulator as dead. Kept, it may be written straight into the output (sharded over `pipeline` as
            # the accumulator is), so temporaries and outputs are counted together.
            return (loss, glp, gx, g) if trainable else (loss, glp, gx)

        with jax.set_mesh(mesh):
            mem = jax.jit(run).lower(params, lp, x, aux).compile().memory_analysis()
            return mem.temp_size_in_bytes + mem.output_size_in_bytes

    per_device_weights = (n // 2) * width * width * 4
    assert temp(True) - temp(False) >= per_device_weights


def test_gradient_accumulator_has_rows_for_trainable_slots_only():
    # Stage 0 holds 6 frozen layers, stage 1 two trainable ones: every device's accumulator has 2 rows, not 6 (the
    # largest stage's slots). Sized by slots (as before), the two compile to the same temporaries; now the partly
    # frozen one saves 4 rows of (w, b) less a few KiB of other temporaries (measured 1,046,528 of 1,052,672 bytes).
    mesh = pipeline_mesh((2,), ("pipeline",))
    width, M = 256, 2
    params = {"w": jnp.zeros((8, width, width)), "b": jnp.zeros((8, width))}
    lp, aux = {"v": jnp.zeros((width, 3))}, {"scale": jnp.zeros((M,)), "target": jnp.zeros((M, 2, 3))}
    x = jnp.zeros((M, 2, width))

    def temp(trainable):
        def run(p, lp, x, aux):
            return pipeline_value_and_grad(layer_fn, p, x, loss_fn=loss_fn, loss_params=lp, aux=aux,
                                           stage_layers=(6, 2), mesh=mesh, trainable_layers=np.asarray(trainable))

        with jax.set_mesh(mesh):
            return jax.jit(run).lower(params, lp, x, aux).compile().memory_analysis().temp_size_in_bytes

    layout = make_layout((6, 2), [0] * 6 + [1] * 2)
    assert layout.grad_rows == 2 and make_layout((6, 2)).grad_rows == 6
    assert temp([1] * 8) - temp([0] * 6 + [1] * 2) >= 3 * width * width * 4


# ----------------------------------------------------------------------------------------------------------------
# ZB-H1 against one device (frozen, partly frozen, LoRA-like adapters).


@pytest.mark.parametrize("schedule,stage_layers,M,trainable,input_grad,param_trainable", [
    ("zb_h1", (1, 3, 2, 1), 5, [0, 0, 1, 0, 1, 1, 0], False, None),  # partly frozen, frozen prefix skips backward
    ("zb_h1", (2, 1, 1), 4, None, True, {"w": False, "b": True}),  # base weight frozen, the bias trains (LoRA-like)
    ("1f1b_fb", (1, 3, 2, 1), 5, [0, 0, 1, 0, 1, 1, 0], False, None),
    ("1f1b_fb", (2, 2, 2, 2), 6, [0] * 8, True, None),  # frozen layers, trainable input: dX everywhere
    ("1f1b_fb", (2, 1, 1), 4, None, True, {"w": False, "b": True}),
    # Two chunks per device (8 virtual stages on 4 devices): the ring and the V.
    ("interleaved", (1, 2, 1, 1, 2, 1, 1, 1), 8, [0, 0, 0, 1, 0, 1, 1, 0, 1, 1], False, None),
    ("interleaved", (2, 1, 1, 1, 1, 2), 4, [0] * 8, True, None),  # three chunks on two devices, frozen, dX only
    ("zb_v", (1, 1, 2, 1, 1, 2, 1, 1), 5, [0, 0, 0, 1, 0, 1, 1, 0, 1, 1], False, None),
    ("zb_v", (2, 1, 1, 1), 4, None, True, {"w": False, "b": True}),  # two devices, LoRA-like, input gradient
    ("zb_v", (1, 1, 1, 1, 1, 1, 1, 1), 6, [0] * 8, True, None),
    # The ppermutes beside the next tick's ops (a message arrives a tick later).
    ("1f1b+overlap", (1, 3, 2, 1), 5, [0, 0, 1, 0, 1, 1, 0], True, None),
    ("zb_h1+overlap", (2, 1, 1), 4, None, True, {"w": False, "b": True}),
    ("1f1b_fb+overlap", (1, 3, 2, 1), 5, [0, 0, 1, 0, 1, 1, 0], False, None),
    ("zb_v+overlap", (1, 1, 2, 1, 1, 2, 1, 1), 5, [0, 0, 0, 1, 0, 1, 1, 0, 1, 1], True, None),
    ("interleaved+overlap", (2, 1, 1, 1, 1, 2), 4, [0] * 8, True, None),
    # Ops cut into slices of layers (default: a tick holds 2 units, one frozen layer's backward or two forwards).
    ("1f1b_sliced", (1, 3, 2, 1), 5, [0, 0, 1, 0, 1, 1, 0], False, None),
    ("1f1b_sliced", (2, 3, 3, 2), 6, [0] * 10, True, None),
    ("1f1b_sliced", (2, 1, 1), 4, None, True, {"w": False, "b": True}),
    ("1f1b_sliced+overlap", (3, 2, 3, 1), 5, [0, 0, 0, 1, 0, 1, 1, 0, 1], True, None),
])
def test_schedules_match_one_device(schedule, stage_layers, M, trainable, input_grad, param_trainable):
    schedule, overlap = schedule.split("+")[0], schedule.endswith("+overlap")
    virtual = {"interleaved": 2 if len(stage_layers) == 8 else 3, "zb_v": 2}.get(schedule, 1)
    mesh = pipeline_mesh((len(stage_layers) // virtual,), ("pipeline",))
    check_equal(mesh, stage_layers, M, trainable, input_grad, schedule=schedule, param_trainable=param_trainable,
                virtual_stages=virtual if schedule == "interleaved" else None, overlap=overlap)


@pytest.mark.parametrize("budget", [1, 3, 5, 40])
def test_sliced_schedule_matches_one_device_at_every_budget(budget):
    """Slices of every size: one layer's op per tick (1), a forward's tail and a backward's head in one tick (3, 5:
    paired slices, the last stage's loss cotangent and a hand-over in the same tick), whole ops paired (40)."""
    stage_layers, trainable = (3, 2, 4, 3), [0, 0, 0, 0, 1, 0, 0, 1, 1, 0, 1, 1]
    layout = make_layout(stage_layers, np.asarray(trainable, bool), input_requires_grad=True,
                         schedule="1f1b_sliced")
    slicing = layout_slicing(layout, budget)
    sched = layout_schedule(layout, 6, slicing=slicing)
    ops = sched.ops
    if budget in (3, 5):
        assert (ops == OP_FB).any() and (sched.column("b_lo") > 0).any()
    if budget == 1:
        assert not (ops == OP_FB).any()
    # 1F1B's order keeps 1F1B's activation memory.
    assert sched.act_slots == build_schedule(4, 6).act_slots
    check_equal(pipeline_mesh((4,), ("pipeline",)), stage_layers, 6, trainable, True, schedule="1f1b_sliced",
                slicing=slicing)


# ----------------------------------------------------------------------------------------------------------------
# The planner plans for the schedule that runs.


def test_planner_picks_the_faster_schedule_by_simulating_it():
    from mllm_jax.parallel.pipeline_plan import lockstep_split, runtime_layer_ops, stage_ops

    # Trainable GEMM layers, some heavier: both schedules' splits are simulated; ZB-H1 fills 1F1B's cool-down.
    layers = [Layer(name=str(i), module="m", weight_flops=1.0 + (i % 3), trainable=i >= 2) for i in range(12)]
    chain = cost_chain(layers, remat=True)[0]
    M, S = 8, 4
    one = lockstep_split(chain, S, microbatches=M, schedule="1f1b")
    zb = lockstep_split(chain, S, microbatches=M, schedule="zb_h1")
    ops = runtime_layer_ops(chain)
    for search, kind in ((one, "1f1b"), (zb, "zb_h1")):
        assert search.time == pytest.approx(simulate(stage_ops(ops, search.counts), M, kind).time)
    # ZB-H1's split is searched from 1F1B's, so it is never slower than ZB-H1 on 1F1B's split.
    assert zb.time <= simulate(stage_ops(ops, one.counts), M, "zb_h1").time + 1e-9
    assert zb.time < one.time
    # Here its local search finds the exhaustive optimum (no split is faster under ZB-H1).
    import itertools
    best = min(simulate(stage_ops(ops, c), M, "zb_h1").time
               for cut in itertools.combinations(range(1, 12), S - 1)
               for c in [np.diff((0,) + cut + (12,))])
    assert zb.time == pytest.approx(best)


def test_auto_schedule_respects_the_memory_budget():
    import dataclasses

    from mllm_jax.config import LLMConfig, ModelConfig
    from mllm_jax.costs import pipeline_costs
    from mllm_jax.parallel.config import ParallelConfig
    from mllm_jax.parallel.pipeline_plan import plan_pipeline

    cfg = ModelConfig(llm=LLMConfig(vocab_size=256, d_model=256, n_layers=8, n_heads=4, n_kv_heads=2, d_ff=768),
                      remat="full")
    costs = pipeline_costs(cfg, text_tokens=512)
    par = ParallelConfig(pipeline=4, microbatches=16, pipeline_schedule="auto")
    free = plan_pipeline(costs, par, placement="outside")
    assert free.runtime.schedule == "1f1b_fb" and free.runtime.runtime_time < free.runtime.runtime_time_1f1b
    # A budget that holds 1F1B's activations but not 1F1B-FB's: the planner keeps a schedule that fits.
    one = plan_pipeline(costs, dataclasses.replace(par, pipeline_schedule="1f1b"), placement="outside")
    assert one.runtime.schedule == "1f1b"
    budget = max(one.runtime.stage_memory) * 1.001
    tight = plan_pipeline(costs, par, placement="outside", memory_budget=budget)
    assert tight.runtime.schedule != "1f1b_fb" and tight.runtime.fits_memory
    assert max(free.runtime.stage_memory) > budget


def test_planner_plans_virtual_stages_as_the_runtime_runs_them():
    """zb_v and interleaved split the LLM into S x V virtual stages; the plan's time is the simulated table of that
    split, its memory per device (its chunks' weights + its pool); ``pipeline_in_flight`` paces zb_v (less memory,
    more time); interleaved needs M a multiple of S (refused when asked for, skipped by "auto")."""
    import dataclasses

    from mllm_jax.config import LLMConfig, ModelConfig
    from mllm_jax.costs import pipeline_costs
    from mllm_jax.parallel.config import ParallelConfig
    from mllm_jax.parallel.pipeline_plan import plan_pipeline, runtime_stage_ops, virtual_memory

    cfg = ModelConfig(llm=LLMConfig(vocab_size=256, d_model=256, n_layers=16, n_heads=4, n_kv_heads=2, d_ff=768),
                      remat="full")
    costs = pipeline_costs(cfg, text_tokens=512)
    par = ParallelConfig(pipeline=4, microbatches=8)
    rt = costs.runtime
    times = {}
    for kind in ("1f1b", "zb_h1", "zb_v", "interleaved"):
        p = plan_pipeline(costs, dataclasses.replace(par, pipeline_schedule=kind), placement="outside").runtime
        assert p.schedule == kind
        counts = p.llm_stage_layers
        assert len(counts) == (8 if kind in ("zb_v", "interleaved") else 4) and sum(counts) == 16
        sim = simulate(runtime_stage_ops(rt.llm, counts, rt.head), 8, kind)
        assert p.runtime_time == pytest.approx(sim.time + p.encoder_time)
        if kind in ("zb_v", "interleaved"):
            assert p.stage_memory == pytest.approx(virtual_memory(rt.llm, rt.head, counts, kind, 2,
                                                                  sim.schedule.peak_act))
        times[kind] = p.runtime_time
    assert times["zb_v"] < times["zb_h1"] < times["1f1b"]  # a trainable LLM: W fills the V's cool-down
    assert times["interleaved"] < times["1f1b"]
    paced = [plan_pipeline(costs, dataclasses.replace(par, pipeline_schedule="zb_v", pipeline_in_flight=n),
                           placement="outside") for n in (4, 2)]
    assert paced[0].runtime.runtime_time == pytest.approx(times["zb_v"])  # 4 = min(S, M), the default
    assert paced[1].runtime.runtime_time > paced[0].runtime.runtime_time
    assert max(paced[1].runtime.stage_memory) < max(paced[0].runtime.stage_memory)
    # Stored in blocks (4 stages divide 16 layers), an uneven split moves rows: the devices' weights and state sum to
    # the layers' once, even or not. Stored replicated (15 layers), every device keeps every layer.
    fixed = lambda chain, c: np.array(virtual_memory(chain, None, c, "zb_v", 2, (0,) * 4))  # noqa: E731
    total = sum(c.param_bytes + c.state_bytes for c in rt.llm)
    for counts in ((2,) * 8, (3,) + (2,) * 6 + (1,)):
        assert fixed(rt.llm, counts).sum() == pytest.approx(total)
    assert fixed(rt.llm[:15], (2,) * 7 + (1,)) == pytest.approx(total * 15 / 16)
    with pytest.raises(ValueError, match="multiple of 4"):
        plan_pipeline(costs, ParallelConfig(pipeline=4, microbatches=6, pipeline_schedule="interleaved"))
    auto = plan_pipeline(costs, ParallelConfig(pipeline=4, microbatches=6, pipeline_schedule="auto"))
    assert auto.runtime.schedule != "interleaved"
    for bad in (dict(pipeline_in_flight=0), dict(pipeline_virtual_stages=1), dict(pipeline_in_flight=True)):
        with pytest.raises(ValueError, match="pipeline_(in_flight|virtual_stages)"):
            ParallelConfig(**bad)


@pytest.mark.parametrize("schedule,counts,trainable", [
    ("zb_v", (2,) * 8, [0, 0, 0, 1, 0, 1, 1, 0] * 2),  # partly frozen: frozen slots' rows come back as zeros
    ("interleaved", (4,) * 4, None),
    # Uneven splits: each device receives the rows it runs from the blocks that store them, by shift.
    ("1f1b", (5, 4, 4, 3), None),
    ("zb_h1", (3, 5, 5, 3), [0, 0, 0, 1, 0, 1, 1, 0] * 2),
    ("zb_v", (3, 2, 2, 2, 2, 2, 2, 1), [1, 0, 0, 1, 0, 1, 1, 0] * 2),
])
def test_stored_blocks_move_to_their_stages_not_every_layer(schedule, counts, trainable):
    """Layers stored over `pipeline` in blocks (the LLM's rule where the stages divide the layers): a uniform
    virtual split moves each device's block to the devices that run its chunks in V ppermute rounds, an uneven split
    (one chunk a device or several) moves the rows each device runs from the blocks that hold them, and the
    gradients come back the same way, against one device; the compiled program has no all-gather over the pipeline
    axis (every device gathering every layer is what the general path does)."""
    import re

    from jax.sharding import NamedSharding, PartitionSpec as P

    from mllm_jax.parallel.pipeline import block_rounds, sequential_value_and_grad
    from test_pipeline import layer_fn, loss_fn, problem

    n, M = 16, 4
    V = 1 if schedule in ("1f1b", "zb_h1") else 2
    stages = len(counts) // V
    mesh = pipeline_mesh((stages,), ("pipeline",))
    params, lp, x, aux = problem(n, M)
    tr = np.ones(n, bool) if trainable is None else np.asarray(trainable, bool)
    loss_ref, (g_ref, glp_ref, _) = jax.jit(
        lambda p, lp, x, aux: sequential_value_and_grad(layer_fn, p, x, loss_fn=loss_fn, loss_params=lp, aux=aux)
    )(params, lp, x, aux)

    def run(p, lp, x, aux):
        return pipeline_value_and_grad(layer_fn, p, x, loss_fn=loss_fn, loss_params=lp, aux=aux, stage_layers=counts,
                                       mesh=mesh, trainable_layers=tr, schedule=schedule)

    with jax.set_mesh(mesh):
        stored = jax.tree.map(lambda a: jax.device_put(a, NamedSharding(mesh, P("pipeline"))), params)
        compiled = jax.jit(run).lower(stored, lp, x, aux).compile()
        loss, (g, glp, _) = compiled(stored, lp, x, aux)
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-5)
    for name in ("w", "b"):
        want = np.asarray(g_ref[name]) * tr.reshape((-1,) + (1,) * (g_ref[name].ndim - 1))
        np.testing.assert_allclose(g[name], want, rtol=2e-5, atol=2e-5)
        assert g[name].sharding.spec[0] == "pipeline"  # returned in the storage layout
    np.testing.assert_allclose(glp["v"], glp_ref["v"], rtol=2e-5, atol=2e-5)
    assert not re.search(r"all-gather", compiled.as_text())
    if len(set(counts)) == 1:
        rounds = block_rounds(make_layout(counts, schedule=schedule))
        assert all(sorted(d for _, d in r) == list(range(stages)) for r in rounds.pairs)  # each a permutation


def test_overlapped_ppermutes_are_priced_as_the_runtime_runs_them():
    """``overlap``: a tick lasts the longer of its slowest op and the ppermutes (which run beside it) instead of
    their sum; messages arrive a tick later, so 1F1B warms up twice as deep (twice the activation slots) and its
    steady state pairs like 1F1B-FB's. The planner prices a run's ``pipeline_overlap_comm`` the same way."""
    import dataclasses

    from mllm_jax.config import LLMConfig, ModelConfig
    from mllm_jax.costs import pipeline_costs
    from mllm_jax.parallel.config import ParallelConfig
    from mllm_jax.parallel.pipeline_plan import plan_pipeline, runtime_stage_ops

    ops = StageOps(f=(1.0,) * 4, b=(2.0,) * 4, w=(1.0,) * 4, bw=(3.0,) * 4)
    for tau in (0.0, 0.5, 2.0):
        plain = simulate(ops, 8, "1f1b", tick_seconds=tau)
        lagged = simulate(ops, 8, "1f1b", overlap=True, tick_seconds=tau)
        assert plain.time == pytest.approx((tick_costs(plain.schedule, ops).max(axis=1) + tau).sum())
        assert lagged.time == pytest.approx(np.maximum(tick_costs(lagged.schedule, ops).max(axis=1), tau).sum())
        assert lagged.time < plain.time
    assert simulate(ops, 8, "1f1b", overlap=True).schedule.act_slots == 2 * 4 - 1
    # With links as slow as a backward the ppermutes dominate either way, but overlapped they cost a tick each,
    # not a tick on top of each op.
    assert simulate(ops, 8, "1f1b", overlap=True, tick_seconds=3.0).time < simulate(ops, 8, "1f1b",
                                                                                  tick_seconds=3.0).time - 30
    cfg = ModelConfig(llm=LLMConfig(vocab_size=256, d_model=256, n_layers=8, n_heads=4, n_kv_heads=2, d_ff=768),
                      remat="full")
    costs = pipeline_costs(cfg, text_tokens=512)
    par = ParallelConfig(pipeline=4, microbatches=8, pipeline_schedule="zb_h1")
    tau = 1e9  # FLOP-units per tick: about a fifth of a layer's forward here
    got = {}
    for overlap in (False, True):
        plan = plan_pipeline(costs, dataclasses.replace(par, pipeline_overlap_comm=overlap), placement="outside",
                             tick_seconds=tau).runtime
        sim = simulate(runtime_stage_ops(costs.runtime.llm, plan.llm_stage_layers, costs.runtime.head), 8, "zb_h1",
                       overlap=overlap, tick_seconds=tau)
        assert plan.runtime_time == pytest.approx(sim.time + plan.encoder_time)
        got[overlap] = plan
    assert got[True].runtime_time < got[False].runtime_time
    assert max(got[True].stage_memory) > max(got[False].stage_memory)  # the deeper warm-up's activations
    with pytest.raises(ValueError, match="pipeline_overlap_comm"):
        ParallelConfig(pipeline_overlap_comm="yes")


def test_a_given_split_is_priced_as_the_run_runs_it():
    """ParallelConfig.pipeline_stage_layers: the plan's runtime placement is the given split (what pipelined_step
    runs), priced on its schedule's table: one chunk a device and a V; a split that does not fit is refused."""
    import dataclasses

    from mllm_jax.config import LLMConfig, ModelConfig
    from mllm_jax.costs import pipeline_costs
    from mllm_jax.parallel.config import ParallelConfig
    from mllm_jax.parallel.pipeline_plan import plan_pipeline, runtime_stage_ops, virtual_memory

    cfg = ModelConfig(llm=LLMConfig(vocab_size=256, d_model=256, n_layers=16, n_heads=4, n_kv_heads=2, d_ff=768),
                      remat="full")
    costs = pipeline_costs(cfg, text_tokens=512)
    rt = costs.runtime
    for kind, given in (("1f1b", (6, 4, 3, 3)), ("zb_h1", (3, 5, 5, 3)), ("zb_v", (3, 2, 2, 2, 2, 2, 2, 1))):
        par = ParallelConfig(pipeline=4, microbatches=8, pipeline_schedule=kind, pipeline_stage_layers=given)
        p = plan_pipeline(costs, par, placement="outside").runtime
        assert (p.name, p.llm_stage_layers, p.schedule) == ("given", given, kind)
        sim = simulate(runtime_stage_ops(rt.llm, given, rt.head), 8, kind)
        assert p.runtime_time == pytest.approx(sim.time + p.encoder_time)
        if kind == "zb_v":
            assert p.stage_memory == pytest.approx(virtual_memory(rt.llm, rt.head, given, kind, 2,
                                                                  sim.schedule.peak_act))
        planned = plan_pipeline(costs, dataclasses.replace(par, pipeline_stage_layers=None), placement="outside")
        assert planned.runtime.runtime_time <= p.runtime_time * (1 + 1e-9)  # the planner's own is no slower
    with pytest.raises(ValueError, match=r"pipeline_stage_layers=\(8, 8\) must have 4 entries"):
        plan_pipeline(costs, ParallelConfig(pipeline=4, microbatches=8, pipeline_stage_layers=(8, 8)))
