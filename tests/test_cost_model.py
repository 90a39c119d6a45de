"""Frozen-aware cost model and pipeline planner: closed forms, optimality against brute force, baselines."""

import itertools

import numpy as np
import pytest

from mllm_jax.config import AudioConfig, LLMConfig, LoRAConfig, ModelConfig, ProjectorConfig, VisionConfig
from mllm_jax.parallel.config import ParallelConfig
from mllm_jax.costs import llm_layer, model_costs, pipeline_costs
from mllm_jax.parallel.cost_model import CostModel, Layer, backward_flops, causal_pairs, cost_chain, stage_memory
from mllm_jax.parallel.pipeline import OP_FWD, stage_op_order
from mllm_jax.parallel.pipeline_plan import (
    format_plan,
    lockstep_lower_bound,
    lockstep_split,
    lockstep_time,
    min_max_split,
    pipeline_time,
    plan_pipeline,
    runtime_stage_costs,
    split_chain,
    uniform_split,
)


def gemm(name, f, trainable):
    return Layer(name=name, module="m", weight_flops=f, trainable=trainable, params=10, act_bytes=7.0, io_bytes=3.0)


def test_backward_closed_forms():
    f = 5.0
    chain = [gemm("a", f, False), gemm("b", f, False), gemm("c", f, True), gemm("d", f, True), gemm("e", f, False)]
    costed, trains = cost_chain(chain)
    # frozen prefix -> 0; first trainable -> dW only (its input needs no gradient); trainable after trainable ->
    # dX + dW = 2f; frozen after trainable -> dX = f.
    assert [c.bwd for c in costed] == [0.0, 0.0, f, 2 * f, f]
    assert trains
    remat, _ = cost_chain(chain, remat=True)
    assert [c.bwd for c in remat] == [0.0, 0.0, 2 * f, 3 * f, 2 * f]  # remat adds f wherever b > 0
    # Saved activations: none without a backward; the layer input under remat.
    assert [c.act_bytes for c in costed] == [0.0, 0.0, 7.0, 7.0, 7.0]
    assert [c.act_bytes for c in remat] == [0.0, 0.0, 3.0, 3.0, 3.0]
    up, _ = cost_chain([gemm("x", f, True)], upstream_trainable=True)
    assert up[0].bwd == 2 * f
    unaware, _ = cost_chain(chain, frozen_aware=False)
    assert [c.bwd for c in unaware] == [2 * f] * 5


def test_attention_products_have_no_weight_gradient():
    layer = Layer(name="l", module="m", weight_flops=4.0, free_flops=3.0)
    assert backward_flops(layer, needs_dx=True) == 4.0 + 2 * 3.0 + 4.0
    assert backward_flops(layer.__class__(**{**layer.__dict__, "trainable": False}), needs_dx=True) == 4.0 + 6.0
    assert backward_flops(layer, needs_dx=False) == 4.0


def test_lora_base_weights_have_no_dw():
    cfg = LLMConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, vocab_size=100)
    lora = LoRAConfig(rank=4, targets=("q", "v"))
    base = llm_layer(cfg, 32)
    with_lora = llm_layer(cfg, 32, lora=lora)
    assert not with_lora.trainable and with_lora.lora_params == 4 * (64 + 64) + 4 * (64 + 32)
    assert with_lora.lora_flops == 2 * 32 * with_lora.lora_params
    b = backward_flops(with_lora, needs_dx=True)
    # dX through base + adapters, dW of adapters only.
    assert b == pytest.approx(base.weight_flops + 2 * base.free_flops + 2 * with_lora.lora_flops)


def test_llm_layer_flops_closed_form():
    cfg = LLMConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96, vocab_size=100)
    s = 16
    layer = llm_layer(cfg, s)
    hd = 16
    expect_w = 2 * s * (64 * 64 + 2 * 64 * 2 * hd + 64 * 64 + 3 * 64 * 96)
    assert layer.weight_flops == expect_w
    assert layer.free_flops == 4 * (s * (s + 1) // 2) * 4 * hd
    assert layer.params == 64 * 64 * 2 + 2 * 64 * 32 + 3 * 64 * 96 + 2 * 64
    # Pair count of a sliding window equals the dense count of the window mask.
    i, j = np.meshgrid(np.arange(20), np.arange(20), indexing="ij")
    assert causal_pairs(20, 6) == int(((j <= i) & (i - j < 6)).sum())


def test_context_planner_block_costs_are_the_layer_costs():
    # One FLOP model: the context planner's alpha (per attention tile) and beta (per token) are a decoder layer's.
    cfg = LLMConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96, vocab_size=100)
    cm = CostModel(d_model=64, d_ff=96, n_heads=4, n_kv_heads=2, head_dim=16, tile_q=8, tile_k=4)
    layer = llm_layer(cfg, 16, attention_pairs=1)
    assert cm.beta == layer.weight_flops / 16
    assert cm.alpha == layer.free_flops * 8 * 4
    # The defaults (a Llama-3-8B layer, 128 x 32 tiles) are unchanged.
    assert CostModel().alpha == 4.0 * 128 * 32 * 128 * 32
    assert CostModel().beta == 2.0 * (4096 * 32 * 128 * 2 + 4096 * 8 * 128 * 2 + 4096 * 14336 * 3)


def tiny_mllm(trainable):
    llm = LLMConfig(d_model=64, n_layers=8, n_heads=4, n_kv_heads=2, d_ff=128, vocab_size=256)
    vis = VisionConfig(image_size=32, patch_size=8, d_model=48, n_layers=4, n_heads=4, d_ff=96)
    aud = AudioConfig(n_mels=16, max_source_positions=24, d_model=32, n_layers=3, n_heads=4, d_ff=64)
    return ModelConfig(
        llm=llm,
        encoders={"vision": vis, "audio": aud},
        projectors={"vision": ProjectorConfig(), "audio": ProjectorConfig(kind="linear")},
        trainable=trainable,
    )


def test_model_costs_frozen_pattern():
    cfg = tiny_mllm({"encoders/vision": False, "encoders/audio": False, "llm": False})
    costs = model_costs(cfg, text_tokens=40)
    for name, chain in costs.encoders.items():
        assert all(c.bwd == 0 for c in chain[:-1]), name  # frozen encoder, nothing upstream trains
        proj = chain[-1]
        assert proj.bwd == proj.layer.weight_flops  # trainable projector after a frozen encoder: dW only
    assert costs.llm_upstream_trainable
    for c in costs.llm:  # frozen LLM after trainable projectors: dX only
        assert c.bwd == pytest.approx(c.layer.weight_flops + 2 * c.layer.free_flops)
    seq = 40 + 16 + 24  # text + vision patches (the class token is dropped before the projector) + audio
    assert costs.llm[0].layer.weight_flops == llm_layer(cfg.llm, seq).weight_flops
    assert costs.encoders["vision"][1].layer.free_flops == 4 * 17 * 17 * 48  # the tower itself sees 16 + 1


def test_stage_memory_only_trainable_has_optimizer_state():
    frozen, _ = cost_chain([gemm("a", 1.0, False)], upstream_trainable=True)
    trainable, _ = cost_chain([gemm("a", 1.0, True)], upstream_trainable=True)
    m_f = stage_memory(frozen, in_flight=3)
    m_t = stage_memory(trainable, in_flight=3)
    assert m_f["optimizer"] == 0 and m_t["optimizer"] == 12 * 10
    assert m_f["params"] == m_t["params"] == 40
    assert m_t["activations"] == 3 * 7.0
    assert stage_memory(trainable, in_flight=3, tensor=2)["total"] == m_t["total"] / 2


def brute_force(chain, stages, M, first, last, budget=float("inf")):
    n = len(chain)
    best = None
    for cuts in itertools.combinations(range(1, n), stages - 1):
        counts = np.diff([0, *cuts, n])
        pieces = split_chain(chain, counts)
        pieces[0] = list(first) + pieces[0]
        pieces[-1] = pieces[-1] + list(last)
        mem = [stage_memory(p, in_flight=min(M, stages - s))["total"] for s, p in enumerate(pieces)]
        if max(mem) > budget:
            continue
        t = pipeline_time([sum(c.total for c in p) for p in pieces], M)
        best = t if best is None else min(best, t)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_planner_split_is_optimal_by_brute_force(seed):
    rng = np.random.default_rng(seed)
    n, stages, M = int(rng.integers(5, 10)), int(rng.integers(2, 5)), int(rng.integers(1, 9))
    layers = [
        Layer(
            name=str(i),
            module="m",
            weight_flops=float(rng.integers(1, 20)),
            free_flops=float(rng.integers(0, 5)),
            trainable=bool(rng.random() < 0.4),
            params=int(rng.integers(1, 50)),
            act_bytes=float(rng.integers(1, 30)),
        )
        for i in range(n)
    ]
    chain, _ = cost_chain(layers)
    first = [cost_chain([gemm("e", 0.5, True)])[0][0]]
    last = [cost_chain([gemm("h", 3.0, True)], upstream_trainable=True)[0][0]]
    budget = float("inf") if seed % 2 == 0 else float(np.median([c.param_bytes + 3 * c.act_bytes for c in chain]) * 4)
    counts = min_max_split(chain, stages, microbatches=M, first_extra=first, last_extra=last, memory_budget=budget)
    want = brute_force(chain, stages, M, first, last, budget)
    if want is None:
        assert counts is None
        return
    pieces = split_chain(chain, counts)
    pieces[0] = first + pieces[0]
    pieces[-1] = pieces[-1] + last
    got = pipeline_time([sum(c.total for c in p) for p in pieces], M)
    assert got == pytest.approx(want)
    uniform = uniform_split(n, stages)
    if budget == float("inf"):
        upieces = split_chain(chain, uniform)
        upieces[0] = first + upieces[0]
        upieces[-1] = upieces[-1] + last
        assert got <= pipeline_time([sum(c.total for c in p) for p in upieces], M) + 1e-9


def test_plan_mllm_beats_uniform_and_baselines():
    cfg = tiny_mllm({"encoders/vision": False, "encoders/audio": False, "llm": False})
    # Make the LLM a frozen prefix followed by trainable layers: b differs across layers.
    cfg = cfg.replace(trainable={"encoders/vision": False, "encoders/audio": False, "projectors/vision": False,
                                 "projectors/audio": False, "llm": True})
    plan = plan_pipeline(pipeline_costs(cfg, text_tokens=40), ParallelConfig(pipeline=4, microbatches=8))
    assert plan.predicted_time <= plan.uniform.predicted_time
    assert plan.predicted_time <= plan.cornstarch.predicted_time + 1e-9
    assert plan.predicted_time <= plan.megatron_like.predicted_time + 1e-9
    assert sum(plan.llm_stage_layers) == 8
    text = format_plan(plan)
    assert "chosen" in text and "cornstarch" in text and "megatron_like" in text


def test_plan_respects_memory_budget_and_names_errors():
    cfg = tiny_mllm({})
    par = ParallelConfig(pipeline=2, microbatches=4)
    free = plan_pipeline(pipeline_costs(cfg, text_tokens=40), par, placement="outside")
    tight = max(free.chosen.stage_memory) * 0.999
    plan = plan_pipeline(pipeline_costs(cfg, text_tokens=40), par, placement="outside", memory_budget=tight)
    assert plan.chosen.fits_memory == (max(plan.chosen.stage_memory) <= tight)
    with pytest.raises(ValueError, match="placement"):
        plan_pipeline(pipeline_costs(cfg, text_tokens=40), par, placement="nowhere")
    with pytest.raises(ValueError, match="fewer than the 16"):
        plan_pipeline(pipeline_costs(cfg, text_tokens=40), ParallelConfig(pipeline=16, microbatches=4))


# ----------------------------------------------------------------------------------------------------------------
# The runtime's step time: lockstep ticks of the 1F1B table with per-op costs.


def lockstep_oracle(F, B, M):
    """Independent lockstep replay: each tick, every stage whose next 1F1B op has its input (sent in an earlier
    tick) runs it; the tick lasts as long as its slowest op."""
    S = len(F)
    orders = stage_op_order(S, M)
    done, pos, total, t = {}, [0] * S, 0.0, 0
    while any(pos[s] < len(orders[s]) for s in range(S)):
        tick = []
        for s in range(S):
            if pos[s] == len(orders[s]):
                continue
            op, m = orders[s][pos[s]]
            if op == OP_FWD:
                dep = ("F", s - 1, m) if s > 0 else None
            else:
                dep = ("F", s, m) if s == S - 1 else ("B", s + 1, m)
            if dep is None or done.get(dep, t) < t:
                tick.append((s, op, m))
        for s, op, m in tick:
            done[("F" if op == OP_FWD else "B", s, m)] = t
            pos[s] += 1
        total += max((F[s] if op == OP_FWD else B[s]) for s, op, _ in tick)
        t += 1
    return total


def test_runtime_op_costs_and_lockstep_closed_forms():
    f = 2.0
    layers = [gemm("a", f, False), gemm("b", f, False), gemm("c", f, True), gemm("d", f, True), gemm("e", f, False)]
    chain, _ = cost_chain(layers, remat=True)
    head = cost_chain([gemm("h", 3.0, True)], upstream_trainable=True)[0][0]
    F, B = runtime_stage_costs(chain, (2, 3), head)
    # Forward op: the layers once (+ the loss forward and backward on the last stage). Backward op: per layer its
    # remat vjp: 0 for the frozen prefix, f + dW, f + dX + dW, f + dX.
    assert F == (2 * f, 3 * f + 3.0 + 2 * 3.0) and B == (0.0, 2 * f + 3 * f + 2 * f)
    # One stage: every op in a tick of its own. Two stages: ticks (F0|-) (F1|F0) (-|B0) (B0|F1), then M - 2 pairs
    # (F|B) (B|F), then (-|B) (B|-): the steady state pairs stage 0's forward with stage 1's backward and the reverse.
    assert lockstep_time([5.0], [7.0], 4) == 4 * 12.0
    (f0, f1), (b0, b1), M = (3.0, 2.0), (1.0, 6.0), 5
    want = f0 + max(f0, f1) + b1 + max(b0, f1) + (M - 2) * (max(f0, b1) + max(b0, f1)) + b1 + b0
    assert lockstep_time([f0, f1], [b0, b1], M) == pytest.approx(want)
    with pytest.raises(ValueError, match="microbatches"):
        lockstep_time([1.0], [1.0], 0)


@pytest.mark.parametrize("seed", range(8))
def test_lockstep_time_matches_replay_and_bound(seed):
    rng = np.random.default_rng(seed)
    S, M = int(rng.integers(1, 6)), int(rng.integers(1, 10))
    F, B = rng.uniform(0, 5, S), rng.uniform(0, 9, S) * (rng.random(S) < 0.8)
    t = lockstep_time(F, B, M)
    assert t == pytest.approx(lockstep_oracle(F, B, M))
    assert lockstep_lower_bound(F, B, M) <= t + 1e-9


def split_fits(chain, counts, M, head, budget):
    pieces = split_chain(chain, counts)
    pieces[-1] = pieces[-1] + [head]
    mem = [stage_memory(p, in_flight=min(M, len(counts) - s))["total"] for s, p in enumerate(pieces)]
    if len(chain) % len(counts):  # the layers stored replicated over the stages: each device keeps every layer
        mem = [m + sum(c.param_bytes + c.state_bytes for c in chain if not any(c is q for q in p))
               for m, p in zip(mem, pieces)]
    return max(mem) <= budget


def brute_force_lockstep(chain, stages, M, head, budget=float("inf")):
    n = len(chain)
    best = None
    for cuts in itertools.combinations(range(1, n), stages - 1):
        counts = tuple(int(c) for c in np.diff([0, *cuts, n]))
        if not split_fits(chain, counts, M, head, budget):
            continue
        t = lockstep_time(*runtime_stage_costs(chain, counts, head), M)
        best = t if best is None else min(best, t)
    return best


@pytest.mark.parametrize("seed", range(16))
def test_lockstep_split_is_optimal_by_brute_force(seed):
    rng = np.random.default_rng(100 + seed)
    n, stages, M = int(rng.integers(5, 11)), int(rng.integers(2, 5)), int(rng.integers(1, 10))
    layers = [
        Layer(
            name=str(i),
            module="m",
            weight_flops=float(rng.integers(1, 20)),
            free_flops=float(rng.integers(0, 5)),
            trainable=bool(rng.random() < 0.4),
            params=int(rng.integers(1, 50)),
            act_bytes=float(rng.integers(1, 30)),
            io_bytes=float(rng.integers(1, 10)),
        )
        for i in range(n)
    ]
    chain, after = cost_chain(layers, upstream_trainable=bool(seed % 3 == 0), remat=True)
    head = cost_chain([gemm("h", float(rng.integers(0, 30)), True)], upstream_trainable=after, remat=True)[0][0]
    # Odd seeds: a budget near the stages' needs. Seeds 8.. count n to a multiple of the stages: the layers are
    # stored in blocks (a device keeps its stage's); below 8 mostly not: stored replicated, a device keeps them all.
    if seed >= 8:
        n = stages * (n // stages)
        chain = chain[:n]
    replicated = sum(c.param_bytes + c.state_bytes for c in chain) if n % stages else 0.0
    budget = float("inf") if seed % 2 == 0 else float(np.median([c.param_bytes + 3 * c.act_bytes for c in chain]) * 4
                                                      + replicated)
    got = lockstep_split(chain, stages, microbatches=M, head=head, memory_budget=budget)
    want = brute_force_lockstep(chain, stages, M, head, budget)
    assert got.exhaustive
    if want is None:
        assert got.counts is None
        return
    assert got.time == pytest.approx(want)
    assert lockstep_time(*runtime_stage_costs(chain, got.counts, head), M) == pytest.approx(want)
    if got.dp_counts is not None and split_fits(chain, got.dp_counts, M, head, budget):
        assert got.time <= got.dp_time + 1e-9  # never worse than the min-max DP's split it starts from


def test_plan_runtime_split_beats_uniform_in_lockstep():
    cfg = tiny_mllm({"encoders/vision": False, "encoders/audio": False, "projectors/vision": False,
                     "projectors/audio": False, "llm": True})
    # Encoders outside here (their forwards in the bubbles: test_bubble_encode.py), so every placement pays them alike.
    plan = plan_pipeline(pipeline_costs(cfg, text_tokens=40), ParallelConfig(pipeline=4, microbatches=8,
                                                                           pipeline_encoders="outside"))
    rt = plan.runtime
    assert rt.runtime_time <= plan.uniform.runtime_time + 1e-9
    assert rt.runtime_time <= plan.chosen.runtime_time + 1e-9  # the formula's split, run by the same runtime
    F, B = rt.runtime_stage_ops
    assert rt.runtime_time_1f1b == pytest.approx(rt.encoder_time + lockstep_time(F, B, 8))
    assert "runtime (lockstep 1F1B ticks)" in format_plan(plan)


def test_native_tower_attention_is_per_temporal_slice_and_window():
    """A Qwen2.5-VL video instance attends within each temporal slice, and its window layers within 8x8-patch
    windows (112 px / 14 px): pairs counted by brute force over the patch grid."""
    from mllm_jax.config import NativeVisionConfig
    from mllm_jax.costs import encoder_layers

    cfg = NativeVisionConfig(kind="qwen2_5_vl", d_model=64, n_heads=4, d_ff=96, n_layers=2, window_size=112,
                             full_attention_layers=(1,), activation="silu")
    t, h, w = 3, 16, 24
    tt, hh, ww = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
    same_slice = tt.reshape(-1, 1) == tt.reshape(1, -1)
    win = (hh // 8) * 100 + ww // 8
    same_window = same_slice & (win.reshape(-1, 1) == win.reshape(1, -1))
    stem, window_layer, full_layer = encoder_layers("v", cfg, tokens=t * h * w, temporal_slices=t)
    d = cfg.d_model
    assert full_layer.free_flops == 4.0 * same_slice.sum() * d
    assert window_layer.free_flops == 4.0 * same_window.sum() * d
    assert stem.weight_flops == 2.0 * t * h * w * cfg.patch_dim * d
    with pytest.raises(ValueError, match="native-resolution"):
        encoder_layers("v", cfg)
    with pytest.raises(ValueError, match="temporal_slices"):
        encoder_layers("v", cfg, tokens=10, temporal_slices=3)


@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen2_5_vl"])
def test_native_tower_and_merger_params_are_the_modules(kind):
    """The cost model's parameter counts of a native tower's layers and its patch merger equal the real modules'."""
    import jax
    from flax import nnx

    from mllm_jax.config import NativeVisionConfig
    from mllm_jax.costs import encoder_layers, projector_layer
    from mllm_jax.native_vision import NativeVisionEncoder
    from mllm_jax.projector import Projector

    q25 = kind == "qwen2_5_vl"
    cfg = NativeVisionConfig(kind=kind, d_model=32, n_heads=4, d_ff=48, n_layers=2, activation="silu" if q25 else
                             "quick_gelu", window_size=112 if q25 else 0, full_attention_layers=(1,) if q25 else ())
    merger = ProjectorConfig(kind="patch_merger", norm="rms" if q25 else "layer")

    def count(make):
        return sum(x.size for x in jax.tree.leaves(nnx.state(nnx.eval_shape(make), nnx.Param)))

    tower = count(lambda: NativeVisionEncoder(cfg, rngs=nnx.Rngs(0)))
    proj = count(lambda: Projector(merger, cfg.d_model, 40, rngs=nnx.Rngs(0)))
    assert sum(layer.params for layer in encoder_layers("v", cfg, tokens=16)) == tower
    assert projector_layer("v", merger, cfg.d_model, 40, 16).params == proj
