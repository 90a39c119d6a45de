"""The pipeline planner chooses the microbatch count (parallel.pipeline_plan.plan_microbatches): for a fixed batch
per pipeline replica, M microbatches of rows / M rows, each op's time affine in its rows (RowCosts), a fixed cost
per tick (the ppermutes) and the schedule's activation slots under a memory budget. Oracles: closed forms of the
2-stage 1F1B lockstep table with affine op costs, T(M) = (2M + 2) (alpha + beta R / M + tau), whose minimum over M is
at sqrt(beta R / (alpha + tau)); the analytic model at other microbatch sizes; the host compiler at a third size."""

import dataclasses
import math

import pytest

from mllm_jax.config import LLMConfig, ModelConfig
from mllm_jax.costs import pipeline_costs
from mllm_jax.parallel.config import ParallelConfig
from mllm_jax.parallel.pipeline_plan import (OPS, RowCosts, analytic_layer_costs, analytic_row_costs, divisors,
                                             fit_row_costs, format_plan, plan_microbatches, tick_seconds_for)

ROWS = 16
TOKENS = 16
CFG = ModelConfig(llm=LLMConfig(vocab_size=64, d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=128))
PAR = ParallelConfig(pipeline=2, microbatches=1, pipeline_schedule="1f1b")


def costs_at(rows):
    return pipeline_costs(CFG, text_tokens=TOKENS, microbatch_size=rows)


def toy_row_costs(alpha, beta):
    """Every decoder layer's op costs alpha / 2 + beta / 2 x rows (FLOPs; peak 1 FLOP/s, no bytes): a stage of two
    layers costs alpha + beta x rows per op; the embedding and the loss head cost nothing."""
    one = costs_at(1).runtime
    ops = {c.name: {op: (0.0, 0.0, 0.0, 0.0) for op in OPS} for c in (one.embed, one.head)}
    for c in one.llm:
        ops[c.name] = {op: (alpha / 2, beta / 2, 0.0, 0.0) for op in OPS}
    return RowCosts(ops, peak_flops=1.0, hbm_bandwidth=1.0, source="toy")


def closed_form(M, alpha, beta, tau=0.0):
    # 2 stages, 1F1B in lockstep, F = BW = alpha + beta R / M on both stages: 2M + 2 ticks of one op each.
    return (2 * M + 2) * (alpha + beta * ROWS / M + tau)


@pytest.mark.parametrize("alpha,beta,tau,want", [
    (0.0, 1.0, 0.0, 16),  # no fixed cost: T = 32 + 32 / M, the most microbatches win
    (1.0, 0.001, 0.0, 1),  # a fixed cost per op that dominates: the fewest ticks win
    (1.0, 1.0, 0.0, 4),  # interior: sqrt(beta R / alpha) = 4
    (1.0, 1.0, 3.0, 2),  # the ppermutes' fixed cost per tick moves it down: sqrt(16 / 4) = 2
])
def test_microbatch_count_is_the_closed_form_optimum(alpha, beta, tau, want):
    plan = plan_microbatches(costs_at, PAR, rows=ROWS, row_costs=toy_row_costs(alpha, beta),
                             link_bandwidth=math.inf, link_latency=tau, placement="outside")
    assert [c.microbatches for c in plan.microbatch_choices] == list(divisors(ROWS)) == [1, 2, 4, 8, 16]
    for c in plan.microbatch_choices:
        assert c.rows == ROWS // c.microbatches and c.schedule == "1f1b" and c.tick_seconds == tau
        assert c.runtime_time == pytest.approx(closed_form(c.microbatches, alpha, beta, tau))
    assert plan.microbatches == want
    assert plan.runtime.llm_stage_layers == (2, 2)
    assert plan.runtime.runtime_time == pytest.approx(min(closed_form(m, alpha, beta, tau) for m in divisors(ROWS)))
    assert "microbatches chosen: " + str(want) in format_plan(plan)


def test_memory_budget_forbids_large_microbatches():
    # Fixed costs dominate (M = 1 is the fastest), but a stage's activations are its schedule's slots x one
    # microbatch's saved inputs: 1F1B's stage s of 2 holds min(M, 2 - s) microbatches of R / M rows, so the peak
    # falls from M = 2 on. A budget between M = 2's and M = 4's: the fastest M that fits is 4.
    from mllm_jax.parallel.cost_model import stage_memory

    rc = toy_row_costs(1.0, 0.001)
    free = plan_microbatches(costs_at, PAR, rows=ROWS, row_costs=rc, placement="outside")
    peak = {c.microbatches: c.peak_memory for c in free.microbatch_choices}
    assert free.microbatches == 1 and all(c.fits_memory for c in free.microbatch_choices)
    one = costs_at(1).runtime
    stages = [[one.embed] + one.llm[:2], one.llm[2:] + [one.head]]
    fixed = [stage_memory(p, in_flight=0)["total"] for p in stages]
    act_per_row = [sum(c.act_bytes for c in p) for p in stages]
    for M, got in peak.items():
        want = max(fixed[s] + min(M, 2 - s) * act_per_row[s] * ROWS / M for s in range(2))
        assert got == pytest.approx(want), M
    assert peak[1] >= peak[2] > peak[4] > peak[8] > peak[16]
    budget = (peak[2] + peak[4]) / 2
    tight = plan_microbatches(costs_at, PAR, rows=ROWS, row_costs=rc, placement="outside", memory_budget=budget)
    assert tight.microbatches == 4 and tight.runtime.fits_memory
    assert [c.fits_memory for c in tight.microbatch_choices] == [False, False, True, True, True]
    # Nothing fits: the fastest is reported, flagged.
    none = plan_microbatches(costs_at, PAR, rows=ROWS, row_costs=rc, placement="outside", memory_budget=1.0)
    assert none.microbatches == 1 and not none.runtime.fits_memory


def test_planned_microbatch_count_is_one_the_train_step_accepts():
    from mllm_jax.train.config import CheckpointConfig, DataConfig, OptimizerConfig, TrainConfig
    from mllm_jax.train.loop import RunConfig, validate

    par = dataclasses.replace(PAR, data=2, pipeline=2, pipeline_schedule="auto")
    batch = 24  # 12 rows per pipeline replica
    plan = plan_microbatches(costs_at, par, rows=batch // par.data, row_costs=toy_row_costs(1.0, 1.0),
                             placement="outside")
    assert [c.microbatches for c in plan.microbatch_choices] == [1, 2, 3, 4, 6, 12]
    cfg = RunConfig(CFG, dataclasses.replace(par, microbatches=plan.microbatches),
                    DataConfig(batch_size=batch, seq_len=TOKENS), OptimizerConfig(), CheckpointConfig(), TrainConfig())
    validate(cfg, 4)  # raises unless data x fsdp x microbatches divides the batch
    with pytest.raises(ValueError, match="must divide rows=12"):
        plan_microbatches(costs_at, par, rows=12, row_costs=toy_row_costs(1.0, 1.0), candidates=(5,))
    with pytest.raises(ValueError, match="sets layer_costs"):
        plan_microbatches(costs_at, par, rows=12, row_costs=toy_row_costs(1.0, 1.0), layer_costs=None)


def test_analytic_row_costs_are_the_analytic_model_at_every_size():
    # FLOPs: the analytic model's at rows r is r x its FLOPs at one row (priced flops-bound with a huge bandwidth).
    rc = analytic_row_costs(costs_at(1), peak_flops=1.0, hbm_bandwidth=1e30)
    for r in (1, 3, 8):
        want = analytic_layer_costs(costs_at(r)).ops
        got = rc.at(r).ops
        for name, ops in want.items():
            for op, v in ops.items():
                assert got[name][op] == pytest.approx(v, rel=1e-9), (r, name, op)
    # Bytes: a layer's weights (bf16) once per weight pass, whatever the rows; a bandwidth-bound roofline.
    slow = analytic_row_costs(costs_at(1), peak_flops=1e30, hbm_bandwidth=1.0)
    layer = costs_at(1).runtime.llm[0]
    w = 2.0 * layer.layer.params
    for op, passes in (("f", 1), ("b", 2), ("bw", 3)):
        fixed = slow.seconds(layer.name, op, 0.0)
        assert fixed == pytest.approx(w * passes)
        assert slow.seconds(layer.name, op, 4.0) == pytest.approx(fixed + 4 * layer.layer.act_bytes * passes)
    assert tick_seconds_for(2048.0, link_bandwidth=1024.0, link_latency=0.5) == 2.5
    with pytest.raises(ValueError, match="link_bandwidth"):
        tick_seconds_for(1.0, link_bandwidth=0.0, link_latency=0.0)


def test_fit_recovers_affine_figures_and_refuses_one_size():
    truth = {"a": {"f": (5.0, 2.0, 100.0, 3.0)}}
    figures = {r: {"a": {"f": (5.0 + 2.0 * r, 100.0 + 3.0 * r)}} for r in (1, 2, 4)}
    rc = fit_row_costs(figures, peak_flops=2.0, hbm_bandwidth=10.0, source="t")
    assert rc.ops["a"]["f"] == pytest.approx(truth["a"]["f"])
    assert rc.seconds("a", "f", 8) == pytest.approx(max((5 + 16) / 2.0, (100 + 24) / 10.0))
    with pytest.raises(ValueError, match="two microbatch sizes"):
        fit_row_costs({1: figures[1]}, peak_flops=1.0, hbm_bandwidth=1.0, source="t")


def test_compiled_row_costs_fixed_part_is_the_weights():
    # The host compiler's FLOPs and bytes of a (frozen: forward only) decoder layer at 1 and 2 rows, fitted affine:
    # the FLOPs have no fixed part, the bytes' fixed part is the layer's weights (float32 here), and the fit predicts
    # the layer compiled at 4 rows (FLOPs within 1%, bytes within 10%: fusion decisions move with the shapes).
    import numpy as np

    from mllm_jax.train.layer_costs import CompileDevice, compile_op, compiled_row_costs, llm_layer_piece
    from mllm_jax.train.targets import CHIPS

    cfg = ModelConfig(llm=LLMConfig(vocab_size=64, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128),
                      trainable={"llm": False})
    rc = compiled_row_costs(cfg, text_tokens=TOKENS, target=None, rows=(1, 2), chip=CHIPS["v5p"])
    assert rc.source == "compiled:cpu" and rc.peak_flops == CHIPS["v5p"].peak_flops
    assert sorted(rc.ops["llm/0"]) == ["f"]  # a frozen LLM with nothing trainable upstream runs forwards only
    ff, fr, bf, br = rc.ops["llm/0"]["f"]
    layer = costs_at(1).runtime.llm[0].layer
    assert ff <= 0.01 * fr
    assert bf == pytest.approx(layer.params * np.dtype(CFG.dtype).itemsize, rel=0.05)
    host = CompileDevice(None)
    at4 = compile_op(llm_layer_piece(cfg, batch=4, seq=TOKENS, attention_impl=host.attention_impl), "f", host)
    assert ff + 4 * fr == pytest.approx(at4["flops"], rel=0.01)
    assert bf + 4 * br == pytest.approx(at4["bytes"], rel=0.10)
    with pytest.raises(ValueError, match="chip"):
        compiled_row_costs(cfg, text_tokens=TOKENS, target=None)


def test_dry_run_prints_the_planned_microbatch_count():
    import gin

    from mllm_jax.train import dry_run, loop

    cfg = loop.load_run_config(["configs/vlm_tiny.gin"], ["ParallelConfig.data = 2", "ParallelConfig.fsdp = 2",
                                                          "ParallelConfig.pipeline = 2"])
    gin.clear_config()
    lines = []
    out = dry_run.report(cfg, print_fn=lines.append)
    plan = out["microbatch_plan"]
    rows = cfg.data.batch_size // 4  # a pipeline replica's rows: batch / (data x fsdp)
    assert [c.microbatches for c in plan.microbatch_choices] == list(divisors(rows))
    assert plan.microbatches == min(plan.microbatch_choices, key=lambda c: c.runtime_time).microbatches
    text = "\n".join(lines)
    assert f"microbatches chosen: {plan.microbatches}" in text and "ParallelConfig.microbatches is 1" in text
    # Priced on v5p: the ppermute of one microbatch's boundary activation per tick (rows x seq_len x d_model; the
    # cost model's 2-byte activations), the row's seq_len tokens including the injected features.
    from mllm_jax.train.targets import CHIPS, PPERMUTE_LATENCY_S

    c = plan.microbatch_choices[0]
    act = c.rows * cfg.data.seq_len * cfg.model.llm.d_model * 2
    assert c.tick_seconds == pytest.approx(PPERMUTE_LATENCY_S + act / CHIPS["v5p"].link_bandwidth)
    loop.validate(dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, microbatches=plan.microbatches)),
                  8)


def test_dry_run_plans_on_compiled_costs():
    # report(target=...): the plan and the microbatch count on per-layer costs compiled from the recipe's layers
    # (here the host compiler: FLOPs; a TPU target gives roofline seconds on its chip); the printed plan names them.
    import gin

    from mllm_jax.parallel.pipeline_plan import plan_pipeline
    from mllm_jax.train import dry_run, loop

    # Frozen LLM and tower, a trainable projector (fewer ops to compile); 2 rows per replica: the plan's microbatch
    # and the two fitted sizes are the same programs.
    cfg = loop.load_run_config(["configs/vlm_tiny.gin"], [
        "ParallelConfig.data = 2", "ParallelConfig.fsdp = 2", "ParallelConfig.pipeline = 2",
        "DataConfig.batch_size = 8", "ModelConfig.trainable = {'llm': False, 'encoders/vision': False}"])
    gin.clear_config()
    lines = []
    out = dry_run.report(cfg, print_fn=lines.append, target="cpu")
    plan, mb = out["pipeline_plan"], out["microbatch_plan"]
    assert plan.cost_source == "compiled:cpu" and mb.cost_source == "compiled:cpu"
    assert "per-layer costs compiled:cpu" in "\n".join(lines)
    # The compiled plan differs from the analytic one only through the table: its step time is the table's.
    analytic = dry_run.pipeline_plan(cfg)
    assert analytic.cost_source == "analytic"
    assert plan.runtime.runtime_time != analytic.runtime.runtime_time
    assert [c.microbatches for c in mb.microbatch_choices] == list(divisors(cfg.data.batch_size // 4))
    # "auto" on a target takes the count planned on the compiled costs (not the analytic fill), and the printed
    # pipeline plan is planned at it.
    auto = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, microbatches="auto"))
    lines = []
    out = dry_run.report(auto, print_fn=lines.append, target="cpu")
    m = out["microbatch_plan"].microbatches
    assert m == mb.microbatches and out["pipeline_plan"].microbatches == m, m
    assert f"ParallelConfig.microbatches is 'auto', filled as {m}" in "\n".join(lines)


def _recipe(gin_file, *params):
    import gin

    from mllm_jax.train import loop

    cfg = loop.load_run_config([gin_file], list(params))
    gin.clear_config()
    return cfg


def test_auto_microbatches_is_the_dry_runs_recommendation():
    # ParallelConfig.microbatches = "auto" is filled (train.loop.for_devices, before anything is built) with the count
    # --dry_run recommends for the same layout and chip: the least simulated step time among the divisors of a
    # replica's rows. LLaVA-7B on fsdp=4 x pipeline=2 of v5p: 32 rows a replica, where the plan takes 32 microbatches
    # (the tiny recipe takes 1: the test would not tell "auto" from a count left at 1).
    from mllm_jax.train import dry_run, loop
    from mllm_jax.train.targets import CHIPS

    layout = ["ParallelConfig.data = 1", "ParallelConfig.fsdp = 4", "ParallelConfig.pipeline = 2",
              "ParallelConfig.tensor = 1", "ParallelConfig.context = 1"]
    auto = _recipe("configs/llava_7b.gin", *layout, "ParallelConfig.microbatches = 'auto'")
    filled = loop.for_devices(auto, 8, chip=CHIPS["v5p"])
    fixed = dataclasses.replace(auto, parallel=dataclasses.replace(auto.parallel, microbatches=1))
    plan = dry_run.microbatch_plan(loop.for_devices(fixed, 8), chip=CHIPS["v5p"])
    best = min(plan.microbatch_choices, key=lambda c: (c.runtime_time, c.microbatches))
    assert filled.parallel.microbatches == best.microbatches > 1
    assert filled.parallel.microbatches in divisors(auto.data.batch_size // 4)
    loop.validate(filled, 8)
    # Priced on another chip, the same layout may take another count, always one of its choices.
    v5e = loop.for_devices(auto, 8, chip=CHIPS["v5e"]).parallel.microbatches
    assert v5e in [c.microbatches for c in plan.microbatch_choices]


def test_auto_microbatches_without_a_pipeline_is_one_and_bad_values_are_refused():
    from mllm_jax.train import loop

    cfg = _recipe("configs/vlm_tiny.gin", "ParallelConfig.data = 8", "ParallelConfig.microbatches = 'auto'")
    assert loop.for_devices(cfg, 8).parallel.microbatches == 1
    with pytest.raises(ValueError, match="ParallelConfig.microbatches must be an integer or 'auto'; got 'autox'"):
        ParallelConfig(microbatches="autox")
    real = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, data=4, pipeline=2),
                               dataset=dataclasses.replace(cfg.dataset, path="/data/llava.json"))
    with pytest.raises(ValueError, match=r"DatasetConfig.path='/data/llava.json'.*as a number"):
        loop.for_devices(real, 8)


def test_train_py_runs_with_auto_microbatches(tmp_path, capsys):
    # Through train.py: the filled count is printed with the layout, and the run trains on it.
    from tests.train_main import TINY, run_main

    rows = run_main(str(tmp_path), TINY + [
        "TrainConfig.steps = 1", "ParallelConfig.data = 4", "ParallelConfig.pipeline = 2",
        "ParallelConfig.microbatches = 'auto'"])
    assert rows[-1]["step"] == 1 and math.isfinite(rows[-1]["loss"])
    assert "microbatches=1 (microbatches \"auto\": the planner's count)" in capsys.readouterr().out
