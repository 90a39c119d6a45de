"""Encodes in the pipeline's warm-up bubbles (parallel.bubble_encode): where the plan puts them (closed forms, the
deadlines it may not pass), and the runtime running them: the one-device loss and gradients, the prepared outputs,
and the instrumented trace equal to the plan."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mllm_jax.parallel.bubble_encode import EncodePlan, check_plan, plan_encodes, slot_deadlines
from mllm_jax.parallel.pipeline import (TRACE_FIELDS, Prepare, pipeline_value_and_grad, runtime_tables,
                                        sequential_value_and_grad)
from mllm_jax.parallel.schedule import OP_IDLE, default_slicing
from test_pipeline import D, layer_fn, loss_fn, pipeline_mesh, problem


def tables(S, M, kind="1f1b", layers=None, input_grad=True, overlap=False):
    layers = layers or (2,) * S
    sl = default_slicing(layers, None, 2) if kind == "1f1b_sliced" else None
    return runtime_tables(layers, M, schedule=kind, input_requires_grad=input_grad, overlap=overlap, slicing=sl)


@pytest.mark.parametrize("S,M", [(4, 16), (4, 6), (8, 32), (3, 3)])
def test_one_encode_a_tick_fills_each_devices_warm_up_idle_ticks(S, M):
    t = tables(S, M)
    K = t.conveyor.per_device
    T = t.schedule.table.shape[0]
    plan = plan_encodes(t.schedule, t.conveyor, M, encode_cost=1.0, tick_cost=np.ones(T))
    check_plan(plan, t.schedule, t.conveyor, M)
    # 1F1B: device d idles in ticks 0..d-1 and slot j stays on it until tick j + 1: one encode in each of those
    # ticks, slots 0, 1, ... (of those holding a microbatch); device 0 never idles before its forwards.
    want = [d * K + j for d in range(1, S) for j in range(min(d, K)) if d * K + j < M]
    assert list(plan.microbatches) == want
    for d in range(1, S):
        n = len([j for j in range(min(d, K)) if d * K + j < M])
        assert (plan.counts[:n, d] == 1).all() and plan.counts[n:, d].sum() == 0
    assert plan.counts[:, 0].sum() == 0


@pytest.mark.parametrize("kind", ["1f1b", "zb_h1", "1f1b_fb", "1f1b_sliced"])
def test_cheap_encodes_take_every_slot_off_device_0_in_the_first_tick(kind):
    S, M = 4, 16
    t = tables(S, M, kind)
    K = t.conveyor.per_device
    T = t.schedule.table.shape[0]
    plan = plan_encodes(t.schedule, t.conveyor, M, encode_cost=0.25, tick_cost=np.ones(T))
    check_plan(plan, t.schedule, t.conveyor, M)
    assert list(plan.microbatches) == list(range(K, M))  # all but device 0's own
    assert (plan.slots[0, 1:] == [0, K]).all()
    # An encode dearer than every tick fits nowhere.
    assert plan_encodes(t.schedule, t.conveyor, M, encode_cost=1.5, tick_cost=np.ones(T)).microbatches == ()


def test_check_plan_refuses_a_busy_tick_a_late_slot_and_a_wrong_list():
    S, M = 4, 16
    t = tables(S, M)
    T, K = t.schedule.table.shape[0], t.conveyor.per_device
    deadline = slot_deadlines(t.schedule, t.conveyor, M)
    assert deadline[1, 0] == 0 and deadline[0, 0] == -1  # device 0 forwards microbatch 0 in tick 0

    def plan_with(t_, d, lo, hi, mbs):
        slots = np.zeros((T, S, 2), np.int32)
        slots[t_, d] = (lo, hi)
        return EncodePlan(slots, tuple(mbs), K)

    check_plan(plan_with(0, 1, 0, 1, [K]), t.schedule, t.conveyor, M)  # the oracle accepts a good one
    assert t.schedule.ops[1, 1] != OP_IDLE
    with pytest.raises(ValueError, match="where it runs an op"):
        check_plan(plan_with(1, 1, 0, 1, [K]), t.schedule, t.conveyor, M)
    with pytest.raises(ValueError, match="after its deadline"):
        check_plan(plan_with(1, 3, 0, 1, [3 * K]), t.schedule, t.conveyor, M)  # slot 0 leaves at the end of tick 0
    with pytest.raises(ValueError, match="are not those"):
        check_plan(plan_with(0, 1, 0, 1, [K + 1]), t.schedule, t.conveyor, M)


def prepare_fn(params, inputs_j, x_j):
    """A toy encoder: features of the microbatch's ``u``, added into its stored input."""
    f = jnp.tanh(inputs_j["u"] @ params["a"])
    return x_j + f, {"features": f}


@pytest.mark.slow
@pytest.mark.parametrize("kind,input_grad,cost", [("1f1b", True, 1.0), ("zb_h1", False, 0.5),
                                                  ("1f1b_sliced", True, 0.3), ("1f1b_fb", True, 0.5)])
def test_runtime_runs_the_encodes_with_the_one_device_loss_and_gradients(kind, input_grad, cost):
    S, M, layers = 4, 10, (2, 1, 2, 1)
    mesh = pipeline_mesh((S,), ("pipeline",))
    params, lp, x_tok, aux = problem(sum(layers), M)
    key = jax.random.key(7)
    u = jax.random.normal(key, (M, 2, 5))
    pp = {"a": jax.random.normal(jax.random.fold_in(key, 1), (5, D)) * 0.5}
    feats = jnp.tanh(u @ pp["a"])
    sl = default_slicing(layers, None, 2) if kind == "1f1b_sliced" else None
    t = runtime_tables(layers, M, schedule=kind, input_requires_grad=input_grad, slicing=sl)
    T, K = t.schedule.table.shape[0], t.conveyor.per_device
    plan = plan_encodes(t.schedule, t.conveyor, M, encode_cost=cost, tick_cost=np.ones(T))
    assert 0 < len(plan.microbatches) < M
    inside = np.isin(np.arange(M), plan.microbatches)
    # What the pipeline starts from: the finished inputs where made before it, the token part where made inside.
    x_start = x_tok + jnp.where(inside[:, None, None], 0.0, feats)
    u_rows = jnp.zeros((S * K,) + u.shape[1:]).at[:M].set(u)

    ref_loss, (g_ref, glp_ref, gx_ref) = jax.jit(lambda p, lp, x, aux, pp: sequential_value_and_grad(
        layer_fn, p, x + prepare_fn(pp, {"u": u}, 0.0)[0], loss_fn=loss_fn, loss_params=lp, aux=aux))(
        params, lp, x_tok, aux, pp)

    def run(p, lp, x, aux, pp, u_rows):
        return pipeline_value_and_grad(layer_fn, p, x, loss_fn=loss_fn, loss_params=lp, aux=aux, stage_layers=layers,
                                       mesh=mesh, input_requires_grad=input_grad, schedule=kind, slicing=sl,
                                       trace=True, prepare=Prepare(prepare_fn, pp, {"u": u_rows}, plan))

    with jax.set_mesh(mesh):
        loss, (g, glp, gx), made, counts = jax.jit(run)(params, lp, x_start, aux, pp, u_rows)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)

    def close(got, want):  # float32 sums in another order: each element within 1e-6 of the array's largest
        want = np.asarray(want)
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6 * np.abs(want).max())

    for name in ("w", "b"):
        close(g[name], g_ref[name])
    close(glp["v"], glp_ref["v"])
    if input_grad:
        close(gx, gx_ref)
    # The prepared microbatches' features come back in their rows; nothing in the others.
    made = np.asarray(made["features"])[:M]
    np.testing.assert_allclose(made[inside], np.asarray(feats)[inside], rtol=1e-6, atol=1e-6)
    assert not made[~inside].any()
    # The instrumented runtime ran exactly the plan's encodes.
    np.testing.assert_array_equal(np.asarray(counts)[..., TRACE_FIELDS.index("encodes")], plan.counts)


def test_runtime_refuses_a_plan_for_another_table():
    S, M, layers = 4, 8, (1, 1, 1, 1)
    mesh = pipeline_mesh((S,), ("pipeline",))
    params, lp, x, aux = problem(4, M)
    other = tables(S, M, "1f1b_fb", layers)
    T = other.schedule.table.shape[0]
    plan = plan_encodes(other.schedule, other.conveyor, M, encode_cost=1.0, tick_cost=np.ones(T))
    u = jnp.zeros((S * other.conveyor.per_device, 2, 5))
    with jax.set_mesh(mesh), pytest.raises(ValueError, match="encode plan"):
        pipeline_value_and_grad(layer_fn, params, x, loss_fn=loss_fn, loss_params=lp, aux=aux, stage_layers=layers,
                                mesh=mesh, prepare=Prepare(prepare_fn, {"a": jnp.zeros((5, D))}, {"u": u}, plan))


# ----------------------------------------------------------------------------------------------------------------
# The planner's choice.


def test_planner_moves_frozen_encoders_into_the_bubbles_where_they_fit():
    from mllm_jax.costs import pipeline_costs
    from mllm_jax.parallel.config import ParallelConfig
    from mllm_jax.parallel.pipeline_plan import (bubble_encodes, encode_cost, format_plan, plan_pipeline,
                                                 runtime_stage_ops, schedule_for)
    from test_cost_model import tiny_mllm

    frozen = {"encoders/vision": False, "encoders/audio": False}
    costs = pipeline_costs(tiny_mllm(frozen), text_tokens=40)
    pc = dict(pipeline=4, microbatches=8, pipeline_schedule="1f1b", pipeline_stage_layers=(2, 2, 2, 2))
    out = plan_pipeline(costs, ParallelConfig(pipeline_encoders="outside", **pc)).runtime
    inside = plan_pipeline(costs, ParallelConfig(pipeline_encoders="bubbles", **pc)).runtime
    assert out.encoders_in_bubbles == 0 and 0 < inside.encoders_in_bubbles < 8
    # The pipeline's table is the same; what leaves the serial encoder time is the moved microbatches' encoders
    # (one device's share of them), and every projector's forward is paid again after the pipeline.
    assert inside.runtime_time - inside.encoder_time == pytest.approx(out.runtime_time - out.encoder_time)
    layers = [c for ch in costs.aware.encoders.values() for c in ch]
    enc = sum(c.total for c in layers if c.layer.module.startswith("encoders/"))
    proj_fwd = sum(c.fwd for c in layers if c.layer.module.startswith("projectors/"))
    per_device_before = -(-(8 - inside.encoders_in_bubbles) // 4)  # of ceil(8 / 4) = 2 with all outside
    assert out.encoder_time - inside.encoder_time == pytest.approx((2 - per_device_before) * enc - 2 * proj_fwd)
    assert inside.runtime_time < out.runtime_time and inside.bubble_fraction < out.bubble_fraction
    # The encodes are work in ticks that were idle: the bubble shrinks by exactly that work.
    sched = schedule_for(runtime_stage_ops(costs.runtime.llm, (2, 2, 2, 2), costs.runtime.head), 8, "1f1b")
    plan = bubble_encodes(costs.runtime, (2, 2, 2, 2), sched, 8)
    assert len(plan.microbatches) == inside.encoders_in_bubbles
    pipe = out.runtime_time - out.encoder_time
    assert out.bubble_fraction - inside.bubble_fraction == pytest.approx(
        plan.counts.sum() * encode_cost(costs.runtime) / (4 * pipe))
    # Every device holds the encoders' and projectors' weights in the compute dtype through the pipeline.
    weights = 2.0 * sum(c.layer.params for c in layers)
    assert np.allclose(np.subtract(inside.stage_memory, out.stage_memory), weights)
    assert "encoders in the bubbles: " in format_plan(plan_pipeline(costs, ParallelConfig(pipeline_encoders="bubbles",
                                                                                           **pc)))
    # A trainable encoder stays outside (its backward needs the pipeline's input gradient).
    thawed = plan_pipeline(pipeline_costs(tiny_mllm({"encoders/audio": False}), text_tokens=40),
                           ParallelConfig(pipeline_encoders="bubbles", **pc)).runtime
    assert thawed.encoders_in_bubbles == 0


@pytest.mark.parametrize("text_tokens,instances", [(40, None), (16, {"vision": 4, "audio": 2}),
                                                   (8, {"vision": 2, "audio": 1}), (4, {"vision": 4, "audio": 2})])
def test_auto_takes_the_bubbles_where_they_save_a_percent_within_memory(text_tokens, instances):
    from mllm_jax.costs import pipeline_costs
    from mllm_jax.parallel.config import ParallelConfig
    from mllm_jax.parallel.pipeline_plan import BUBBLE_MIN_GAIN, plan_pipeline
    from test_cost_model import tiny_mllm

    costs = pipeline_costs(tiny_mllm({"encoders/vision": False, "encoders/audio": False}), text_tokens=text_tokens,
                           instances=instances)
    pc = dict(pipeline=4, microbatches=8, pipeline_schedule="1f1b", pipeline_stage_layers=(2, 2, 2, 2))
    out = plan_pipeline(costs, ParallelConfig(pipeline_encoders="outside", **pc)).runtime
    inside = plan_pipeline(costs, ParallelConfig(pipeline_encoders="bubbles", **pc)).runtime
    auto = plan_pipeline(costs, ParallelConfig(**pc)).runtime
    gain = 1 - inside.runtime_time / out.runtime_time
    assert 0.004 < gain < 0.02  # the cases sit on both sides of the rule
    assert auto == (inside if gain >= BUBBLE_MIN_GAIN else out)
    # Within a budget that the encoders' weights would exceed, "auto" keeps them outside.
    tight = plan_pipeline(costs, ParallelConfig(**pc), memory_budget=max(out.stage_memory) + 1.0).runtime
    assert tight.encoders_in_bubbles == 0
