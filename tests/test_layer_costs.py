"""Per-layer op costs compiled from the real layers (mllm_jax.train.layer_costs) and the planner on such a table:
compiled F / B / W / BW of a decoder layer against the closed forms, no W for a frozen layer, the plan on the analytic
model's own table equals the plan without one, and a costlier layer kind moves the split (checked by brute force)."""

import dataclasses
import itertools

import numpy as np
import pytest

from mllm_jax.config import AudioConfig, LLMConfig, ModelConfig, ProjectorConfig, VisionConfig
from mllm_jax.costs import llm_layer, pipeline_costs, projector_layer
from mllm_jax.parallel.config import ParallelConfig
from mllm_jax.parallel.cost_model import backward_flops
from mllm_jax.parallel.pipeline_plan import (LayerCosts, analytic_layer_costs, plan_pipeline, stage_ops,
                                             runtime_head_cost, with_layer_costs)
from mllm_jax.parallel.schedule import simulate
from mllm_jax.train.layer_costs import CompileDevice, compile_op, compiled_layer_costs, llm_layer_piece

SEQ = 16
LLM_CFG = LLMConfig(vocab_size=64, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128)


def _layer_flops(config):
    """Every op of one decoder layer of ``config``, compiled on the host: {op: FLOPs}."""
    host = CompileDevice(None)
    piece = llm_layer_piece(config, batch=1, seq=SEQ, attention_impl=host.attention_impl)
    return {op: compile_op(piece, op, host)["flops"] for op in ("f", "b", "w", "bw")}


def test_compiled_decoder_layer_ops_match_the_closed_forms():
    fig = _layer_flops(ModelConfig(llm=LLM_CFG))
    # The host's attention (impl "xla") computes every (q, k) pair of the S x S scores: the closed form with S^2
    # pairs. Softmax, norms, RoPE and the activation are elementwise FLOPs the closed form leaves out: the compiled
    # figures are 0-6% above it.
    layer = llm_layer(LLM_CFG, SEQ, attention_pairs=SEQ * SEQ)
    f = layer.fwd
    dw = backward_flops(layer, False)
    dx = backward_flops(layer, True) - dw
    # A backward op recomputes the forward but for the layer's last product (the MLP's down projection): its output
    # is only the next layer's input, which no gradient here needs.
    down = 2 * SEQ * LLM_CFG.d_ff * LLM_CFG.d_model
    # W: the vjp with respect to the weights needs every cotangent inside the layer (the norm scales' gradients need
    # the cotangent at the norm's output, which comes back through q, k and v), so it costs the fused backward: only
    # the elementwise input gradient of the first norm is left out.
    closed = {"f": f, "b": f - down + dx, "w": f - down + dx + dw, "bw": f - down + dx + dw}
    for op, want in closed.items():
        assert 1.0 <= fig[op] / want <= 1.06, (op, fig[op], want)
    assert fig["w"] < fig["bw"]
    assert fig["w"] > 1.4 * (f + dw)  # the analytic runtime_layer_ops' W (forward + dW) is far too low


def test_frozen_layer_compiles_no_weight_gradient():
    cfg = ModelConfig(llm=LLM_CFG, trainable={"llm": False})
    fig = _layer_flops(cfg)
    assert fig["w"] == 0.0  # nothing to differentiate: the program computes nothing
    assert fig["bw"] == fig["b"] > fig["f"] > 0
    # By the frozen rule, a frozen LLM with nothing upstream is priced at its forward only; every op's table entry
    # is its compiled FLOPs on the host (no roofline without chip figures).
    table = compiled_layer_costs(cfg, text_tokens=SEQ)
    assert table.source == "compiled:cpu"
    assert table.ops["llm/0"] == table.ops["llm/1"] == {"f": fig["f"]}
    assert set(table.ops["llm/head"]) == {"f"}


# ----------------------------------------------------------------------------------------------------------------
# The planner on a table.


def _mm_config(llm_trains: bool, n_layers: int = 8):
    return ModelConfig(
        llm=dataclasses.replace(LLM_CFG, n_layers=n_layers),
        encoders={"vision": VisionConfig(kind="siglip", image_size=32, patch_size=8, d_model=32, n_layers=3,
                                         n_heads=2, d_ff=64, class_token=False),
                  "audio": AudioConfig(n_mels=8, max_source_positions=16, d_model=32, n_layers=2, n_heads=2,
                                       d_ff=64)},
        # quick_gelu: XLA counts an exact GELU's erf as ~60 FLOPs an element, which outweighs these tiny matmuls.
        projectors={"vision": ProjectorConfig(kind="mlp", activation="quick_gelu"),
                    "audio": ProjectorConfig(kind="mlp")},
        trainable={"llm": llm_trains, "encoders/vision": False, "encoders/audio": False,
                   "projectors/vision": True, "projectors/audio": True},
        remat="full",
    )


def _plan_key(plan):
    def place(p):
        return None if p is None else (p.name, p.llm_stage_layers, tuple(sorted(p.encoder_stage_layers.items())),
                                       p.schedule)
    return [place(p) for p in (plan.chosen, plan.runtime, plan.uniform, plan.cornstarch, plan.megatron_like)]


@pytest.mark.parametrize("llm_trains", [False, True])
def test_plan_on_the_analytic_table_equals_the_plan_without_one(llm_trains):
    costs = pipeline_costs(_mm_config(llm_trains), text_tokens=SEQ)
    pc = ParallelConfig(pipeline=4, microbatches=6, pipeline_schedule="auto")
    base = plan_pipeline(costs, pc)
    table = analytic_layer_costs(costs)
    tabled = plan_pipeline(costs, pc, layer_costs=table)
    assert base.cost_source == "analytic" and tabled.cost_source == "analytic"
    assert _plan_key(tabled) == _plan_key(base)
    for a, b in [(base.runtime, tabled.runtime), (base.cornstarch, tabled.cornstarch),
                 (base.megatron_like, tabled.megatron_like), (base.chosen, tabled.chosen)]:
        assert b.runtime_time == pytest.approx(a.runtime_time, rel=1e-12)
        assert b.predicted_time == pytest.approx(a.predicted_time, rel=1e-12)
        assert b.bubble_fraction == pytest.approx(a.bubble_fraction, rel=1e-9)
    # A row missing is refused by name.
    short = LayerCosts({k: v for k, v in table.ops.items() if k != "llm/3"}, source="short")
    with pytest.raises(ValueError, match="llm/3"):
        plan_pipeline(costs, pc, layer_costs=short)


def _brute_force_1f1b(costs, stages, M):
    """(least lockstep 1F1B time, its split) over every contiguous split, by simulate()."""
    rt = costs.runtime
    from mllm_jax.parallel.pipeline_plan import runtime_layer_ops
    ops = runtime_layer_ops(rt.llm)
    head = runtime_head_cost(rt.head)
    n, best = len(rt.llm), (float("inf"), None)
    for cuts in itertools.combinations(range(1, n), stages - 1):
        counts = np.diff((0,) + cuts + (n,))
        t = simulate(stage_ops(ops, counts, head), M, "1f1b").time
        best = min(best, (t, tuple(int(c) for c in counts)))
    return best


def test_a_costlier_layer_kind_moves_the_split():
    costs = pipeline_costs(_mm_config(False, n_layers=12), text_tokens=SEQ)
    pc = ParallelConfig(pipeline=3, microbatches=4, pipeline_schedule="1f1b")
    table = analytic_layer_costs(costs)
    base = plan_pipeline(costs, pc, layer_costs=table)
    # The table says the loss head costs as much as four decoder layers' ops (a large vocabulary).
    layer = table.ops["llm/0"]
    heavy = LayerCosts({**table.ops, "llm/head": {op: 4 * layer.get(op, 0.0) + 1.0 for op in ("f", "b", "w", "bw")}},
                       source="heavy head")
    plan = plan_pipeline(costs, pc, layer_costs=heavy)
    assert plan.cost_source == "heavy head"
    assert plan.runtime.llm_stage_layers != base.runtime.llm_stage_layers
    assert plan.runtime.llm_stage_layers[-1] < base.runtime.llm_stage_layers[-1]  # the head's stage sheds layers
    # The split is the best of all splits under the heavy table, and the analytic one's is the best under its own.
    for tab, p in ((heavy, plan), (table, base)):
        t, counts = _brute_force_1f1b(with_layer_costs(costs, tab), 3, 4)
        assert p.runtime.llm_stage_layers == counts
        assert p.runtime.runtime_time - p.runtime.encoder_time == pytest.approx(t, rel=1e-12)


def test_compiled_multimodal_table_prices_every_layer_and_plans():
    """A frozen-encoder, trainable-projector, frozen-LLM model compiled on the host: each layer gets exactly the ops
    its position runs; the encoder layer and projector forwards match their closed forms; the planner reports it."""
    cfg = _mm_config(False, n_layers=4)
    table = compiled_layer_costs(cfg, text_tokens=SEQ)
    costs = pipeline_costs(cfg, text_tokens=SEQ)
    assert set(table.ops["encoders/vision/1"]) == {"f"}  # frozen, nothing upstream: forward only
    assert set(table.ops["projectors/vision"]) == {"f", "w"}  # trains, frozen upstream: no dX
    assert set(table.ops["llm/2"]) == {"f", "b"}  # frozen below a trainable projector: dX only
    assert table.ops["projectors/vision"]["w"] > table.ops["projectors/vision"]["f"] > 0
    # Identical layers compiled once: every encoder layer of a tower has the one figure.
    assert table.ops["encoders/vision/0"] == table.ops["encoders/vision/2"]
    vis = cfg.encoders["vision"]
    proj = projector_layer("vision", cfg.projectors["vision"], vis.d_model, cfg.llm.d_model, vis.num_features)
    # Compiled forwards vs the closed forms: the elementwise work (norms, softmax, quick_gelu) on top, 2-7%.
    closed = {c.name: c.layer.fwd for c in costs.aware.encoders["vision"]} | {"projectors/vision": proj.fwd}
    for name in ("encoders/vision/stem", "encoders/vision/1", "projectors/vision"):
        assert 1.0 <= table.ops[name]["f"] / closed[name] <= 1.08, (name, table.ops[name]["f"], closed[name])
    plan = plan_pipeline(costs, ParallelConfig(pipeline=2, microbatches=4, pipeline_schedule="auto"),
                         layer_costs=table)
    assert plan.cost_source == "compiled:cpu"
    assert sum(plan.runtime.llm_stage_layers) == 4
