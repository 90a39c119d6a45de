"""Frozen-aware pipeline planning, predicted as our runtime runs it: iteration time of our plan vs Cornstarch's
placement and a frozen-unaware (Megatron-like) placement for the nine MLLMs of Cornstarch's evaluation, all simulated
tick by tick under the lockstep schedule our runtime executes (``predictor: "runtime_schedule"``), and a compiled
balance check on the real decoder layers of a partly frozen LLM.

  python benchmarks/pipeline.py --out /tmp/pipeline.json [--quick] [--png /tmp/pipeline_timeline.png]
      [--costs=compiled --target=tpu:v5p:2x2x1]

(a) is per-layer costs of public architecture shapes, analytic (parallel.cost_model over mllm_jax.costs' layers) or
with ``--costs=compiled`` compiled from the real layers for ``--target`` (mllm_jax.train.layer_costs: forward, B, W,
BW of each layer kind by the target's compiler, roofline time on its chip; times then in seconds on that chip; the
JSON's ``costs`` says which; communication not modelled), the same costs for every placement: "ours" is the
encoders-outside placement with the LLM split and schedule (1F1B, ZB-H1 or 1F1B-FB) the planner picks for our runtime
(``PipelinePlan.runtime``), "cornstarch"
Cornstarch's (5,1,1) placement (each encoder on a stage of its own) and "megatron_like" a frozen-unaware planner's,
both run as our runtime would run them (encoder stages at the depths before the LLM's first stage, lockstep ticks,
the fastest schedule). model_details adds Cornstarch's own asynchronous 1F1B formula for its placement.
(b) compiles one real decoder layer (``LLM.stage_layer``) on the host for its forward, input-gradient (B),
weight-gradient (W) and fused backward ops (cost_analysis FLOPs), plans 4-stage splits of a 32-layer LLM whose first
half is frozen on those per-layer costs, and compiles each stage's ops (its layers, straight line, with the runtime's
own per-layer vjps ``parallel.pipeline.layer_grads``): per-stage FLOPs over the step = the table's op counts x each
op's compiled FLOPs, max/mean for the frozen-aware FLOP-balanced split (``stage_flops_ratio_planned``), the split
with the least simulated lockstep time (``stage_flops_ratio_runtime_plan``: lockstep balances each tick's forward
and backward ops, not each stage's total) and the uniform one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._report import report  # noqa: E402
from mllm_jax.config import AudioConfig, LLMConfig, ModelConfig, ProjectorConfig, VisionConfig  # noqa: E402
from mllm_jax.parallel.config import ParallelConfig  # noqa: E402
from mllm_jax.costs import pipeline_costs  # noqa: E402
from mllm_jax.parallel.pipeline_plan import plan_pipeline, schedule_in_flight  # noqa: E402
from mllm_jax.parallel.schedule import OP_B, OP_BW, OP_F, OP_FB, OP_W  # noqa: E402


@dataclasses.dataclass(frozen=True)
class MoELLMConfig(LLMConfig):
    """Mixtral: the cost model reads n_experts / experts_per_token (d_ff is one expert's)."""

    n_experts: int = 8
    experts_per_token: int = 2


@dataclasses.dataclass(frozen=True)
class GatedVisionConfig(VisionConfig):
    gated_mlp: bool = True  # Pixtral's vision FFN is SwiGLU


# Public architecture facts (config.json of each model).
LLMS = {
    "llama3.1-8b": LLMConfig(vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, d_ff=14336),
    "phi3-small": LLMConfig(vocab_size=100352, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, d_ff=14336),
    "mistral-7b": LLMConfig(
        vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, d_ff=14336, sliding_window=4096
    ),
    "gemma2-27b": LLMConfig(
        vocab_size=256000, d_model=4608, n_layers=46, n_heads=32, n_kv_heads=16, head_dim=128, d_ff=36864
    ),
    "internlm2.5-20b": LLMConfig(vocab_size=92544, d_model=6144, n_layers=48, n_heads=48, n_kv_heads=8, d_ff=16384),
    "qwen2.5-14b": LLMConfig(
        vocab_size=152064, d_model=5120, n_layers=48, n_heads=40, n_kv_heads=8, d_ff=13824, qkv_bias=True
    ),
    "qwen2.5-72b": LLMConfig(
        vocab_size=152064, d_model=8192, n_layers=80, n_heads=64, n_kv_heads=8, d_ff=29568, qkv_bias=True
    ),
    "mixtral-8x7b": MoELLMConfig(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, d_ff=14336),
    "llama3.1-70b": LLMConfig(vocab_size=128256, d_model=8192, n_layers=80, n_heads=64, n_kv_heads=8, d_ff=28672),
}
# Encoders, with the tokens of one 1280x720 image / one 30 s clip: (config, tokens in the tower, tokens injected).
ENCODERS = {
    # Native resolution, 16 px patches: 80 x 45.
    "pixtral-400m": (GatedVisionConfig(kind="vit", patch_size=16, d_model=1024, n_layers=24, n_heads=16, d_ff=4096,
                                       class_token=False), 3600, 3600),
    "siglip-so400m": (VisionConfig(kind="siglip", image_size=384, patch_size=14, d_model=1152, n_layers=27,
                                   n_heads=16, d_ff=4304, class_token=False), 729, 729),
    # InternViT-6B at 448 px (32 x 32 patches + class token), pixel shuffle 2x2 -> 256 tokens.
    "internvit-6b": (VisionConfig(kind="vit", image_size=448, patch_size=14, d_model=3200, n_layers=45, n_heads=25,
                                  d_ff=12800), 1025, 256),
    # Qwen2-VL: 1280x720 -> 1288x728 (multiples of 28), 92 x 52 patches of 14 px, merged 2x2 -> 1196 tokens.
    "qwen2vl-vit-675m": (VisionConfig(kind="vit", patch_size=14, d_model=1280, n_layers=32, n_heads=16, d_ff=5120,
                                      class_token=False), 4784, 1196),
    "vit-22b": (VisionConfig(kind="vit", image_size=224, patch_size=14, d_model=6144, n_layers=48, n_heads=48,
                             d_ff=24576, class_token=False), 256, 256),
    "eva-clip-18b": (VisionConfig(kind="clip", image_size=224, patch_size=14, d_model=5120, n_layers=48, n_heads=40,
                                  d_ff=13696), 257, 256),
    "whisper-242m": (AudioConfig(d_model=768, n_layers=12, n_heads=12, d_ff=3072), 1500, 1500),
    "whisper-307m": (AudioConfig(d_model=1024, n_layers=24, n_heads=16, d_ff=4096), 1500, 1500),
    # Qwen2-Audio's encoder is Whisper-large-v3's (128 mels) with 2x average pooling -> 750 tokens.
    "qwen2-audio-enc": (AudioConfig(n_mels=128, d_model=1280, n_layers=32, n_heads=20, d_ff=5120), 1500, 750),
    "whisper-1.5b": (AudioConfig(n_mels=128, d_model=1280, n_layers=32, n_heads=20, d_ff=5120), 1500, 1500),
}
# name: (LLM, vision encoder or None, audio encoder or None, frozen-unaware (LLM, vision, audio) stages).
MODELS = {
    "VLM-S": ("llama3.1-8b", "pixtral-400m", None, (5, 1, 0)),
    "ALM-S": ("phi3-small", None, "whisper-242m", (5, 0, 1)),
    "VALM-S": ("mistral-7b", "siglip-so400m", "whisper-242m", (5, 1, 1)),
    "VLM-M": ("gemma2-27b", "internvit-6b", None, (4, 2, 0)),
    "ALM-M": ("internlm2.5-20b", None, "whisper-307m", (5, 0, 1)),
    "VALM-M": ("qwen2.5-14b", "qwen2vl-vit-675m", "whisper-307m", (3, 3, 3)),
    "VLM-L": ("qwen2.5-72b", "vit-22b", None, (4, 2, 0)),
    "ALM-L": ("mixtral-8x7b", None, "qwen2-audio-enc", (5, 0, 1)),
    "VALM-L": ("llama3.1-70b", "eva-clip-18b", "whisper-1.5b", (4, 2, 2)),
}
DEVICE_FLOPS = 100e12  # per device; only ratios matter (communication is not modelled)


def model_config(name):
    llm, vis, aud, _ = MODELS[name]
    encoders, tokens, feats, trainable = {}, {}, {}, {"llm": False}
    for key, enc in (("vision", vis), ("audio", aud)):
        if enc is None:
            continue
        cfg, t, f = ENCODERS[enc]
        encoders[key], tokens[key], feats[key] = cfg, t, f
        trainable[f"encoders/{key}"] = False
        trainable[f"projectors/{key}"] = True
    cfg = ModelConfig(
        llm=LLMS[llm],
        encoders=encoders,
        projectors={k: ProjectorConfig(kind="mlp") for k in encoders},
        trainable=trainable,
        remat="full",
        dtype="bfloat16",  # what the compiled layers compute in (the analytic costs count 2-byte activations too)
    )
    return cfg, tokens, feats


def layer_cost_table(name, target, log=None):
    """The compiled per-layer op costs of ``name`` on ``target`` (mllm_jax.train.layer_costs; layer kinds shared by
    several models compile once)."""
    from mllm_jax.train.layer_costs import compiled_layer_costs

    cfg, tokens, feats = model_config(name)
    return compiled_layer_costs(cfg, text_tokens=1024, encoder_tokens=tokens, feature_tokens=feats, target=target,
                                log=log)


def w_vs_bw(target) -> dict:
    """Every op of one trainable decoder layer (VLM-S's Llama-3.1-8B at its sequence, the LLM made trainable),
    compiled: how W (dW only) compares with the fused backward and B (F and B are the frozen layer's programs)."""
    from mllm_jax.costs import modality_shapes
    from mllm_jax.train.layer_costs import CompileDevice, compile_op, llm_layer_piece

    cfg, tokens, feats = model_config("VLM-S")
    cfg = cfg.replace(trainable={**cfg.trainable, "llm": True})
    seq = 1024 + sum(s.injected for s in modality_shapes(cfg, encoder_tokens=tokens, feature_tokens=feats).values())
    device = CompileDevice(target)
    piece = llm_layer_piece(cfg, batch=1, seq=seq, attention_impl=device.attention_impl)
    fig = {op: compile_op(piece, op, device) for op in ("f", "b", "w", "bw")}
    f = fig["f"]["cost"]
    return {"model": f"VLM-S (llama3.1-8b layer at {seq} tokens, trainable)",
            **{f"{op}_over_f": fig[op]["cost"] / f for op in ("b", "w", "bw")},
            "w_over_bw": fig["w"]["cost"] / fig["bw"]["cost"], "figures": fig}


# The schedules that can hold no more activations than 1F1B (parallel.schedule: ZB-H1 moves weight gradients into
# 1F1B's cool-down without new microbatches in flight; 1F1B-sliced runs 1F1B's order in slices of layers; ZB-V holds
# at most 2 half-stage inputs per microbatch in flight); 1F1B-FB pairs a forward and a backward per tick and holds
# about twice as many, interleaved more too.
# Each plan's activation pool is measured (``activation_rows``), not assumed.
EQUAL_MEMORY_SCHEDULES = ("1f1b", "zb_h1", "1f1b_sliced", "zb_v")


def predicted(name, microbatches=24, tensor=2, schedule="auto", table=None, device_flops=DEVICE_FLOPS,
              in_flight=None, stage_layers=None, encoders="auto"):
    cfg, tokens, feats = model_config(name)
    llm_s, vis_s, aud_s = MODELS[name][3]
    megatron = {"llm": llm_s, **({"vision": vis_s} if vis_s else {}), **({"audio": aud_s} if aud_s else {})}
    n_enc = len(cfg.encoders)
    stages = 5 + n_enc  # Cornstarch's (5, 1, 1): five LLM stages and one per encoder
    cornstarch = {"llm": 5, **{k: 1 for k in cfg.encoders}}
    plan = plan_pipeline(
        pipeline_costs(cfg, text_tokens=1024, encoder_tokens=tokens, feature_tokens=feats),
        ParallelConfig(pipeline=stages, tensor=tensor, microbatches=microbatches, pipeline_in_flight=in_flight,
                       pipeline_stage_layers=stage_layers, pipeline_encoders=encoders),
        device_flops=device_flops,
        cornstarch_stages=cornstarch,
        megatron_stages=megatron,
        schedule=schedule,
        layer_costs=table,
    )
    return plan


# ----------------------------------------------------------------------------------------------------------------
# (b) compiled on the real decoder layers (runs in a subprocess).

MEASURE = r"""
import json, sys, time
import numpy as np
import jax, jax.numpy as jnp
sys.path.insert(0, REPO)
from flax import nnx
from mllm_jax.config import LLMConfig
from mllm_jax.kernels.meta import TokenMeta
from mllm_jax.llm import LLM
from mllm_jax.parallel.cost_model import Layer, cost_chain
from mllm_jax.parallel.pipeline import (KIND_DW, KIND_DX, KIND_DX_DW, KIND_NONE, layer_grads, layout_schedule,
                                        make_layout)
from mllm_jax.parallel.pipeline_plan import lockstep_split, min_max_split, stage_ops, uniform_split
from mllm_jax.parallel.schedule import OP_B, OP_BW, OP_F, OP_FB, OP_W, simulate

S, M, N_FROZEN, N_TRAIN, D, SEQ, MB = CFG
n = N_FROZEN + N_TRAIN
trainable = np.array([False] * N_FROZEN + [True] * N_TRAIN)
cfg = LLMConfig(vocab_size=256, d_model=D, n_layers=n, n_heads=D // 64, n_kv_heads=max(1, D // 128), d_ff=3 * D)
llm = LLM(cfg, rngs=nnx.Rngs(0))
layer, window_codes = llm.stage_layer()
values, _ = llm.layer_params()
one = jax.tree.map(lambda a: a[0], values)
p1 = {"weights": one}
meta = TokenMeta(*(jnp.broadcast_to(jnp.arange(SEQ, dtype=jnp.int32), (MB, SEQ)) * k for k in (1, 0, 0)))
meta = TokenMeta(meta.positions, jnp.ones((MB, SEQ), jnp.int32), jnp.zeros((MB, SEQ), jnp.int32))
layer_fn = lambda p, h, aux: layer(p, h, meta)
x = jnp.zeros((MB, SEQ, D))

def flops(f, *args):
    ca = jax.jit(f).lower(*args).compile().cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    return float(ca.get("flops", 0.0))

t0 = time.time()
# One layer's ops, compiled: forward, B (dX only), W (dW only), BW (both), W of a layer with nothing upstream.
f = flops(lambda p, h: layer_fn(p, h, None), p1, x)
b = flops(lambda p, h, g: layer_grads(layer_fn, p, h, g, None, dx=True, dw=False)[1], p1, x, x)
w = flops(lambda p, h, g: layer_grads(layer_fn, p, h, g, None, dx=False, dw=True)[0], p1, x, x)
bw = flops(lambda p, h, g: layer_grads(layer_fn, p, h, g, None, dx=True, dw=True), p1, x, x)
compile_layer_s = time.time() - t0
layout_all = make_layout((n,), trainable)
kinds = layout_all.kind[0]
# Per-layer op costs by the frozen rule, from the compiled ones.
ops = {"f": np.full(n, f), "b": np.where((kinds == KIND_DX) | (kinds == KIND_DX_DW), b, 0.0),
       "w": np.where(kinds >= KIND_DW, w, 0.0), "bw": np.select([kinds == KIND_DX_DW, kinds == KIND_DW,
                                                                   kinds == KIND_DX], [bw, w, b], 0.0)}
# The analytic cost model's layers (for the chain's memory and as a comparison of per-layer costs).
from mllm_jax.costs import llm_layer
layers = [llm_layer(cfg, SEQ, index=i, batch=MB, trainable=bool(t)) for i, t in enumerate(trainable)]
chain, _ = cost_chain(layers, remat=True)
from mllm_jax.parallel.pipeline_plan import runtime_layer_ops
analytic = runtime_layer_ops(chain)
a_first_dxdw = int(np.flatnonzero(kinds == KIND_DX_DW)[0])
analytic_vs_compiled = {k: float(analytic[k][a_first_dxdw] / {"f": f, "b": b, "w": w, "bw": bw}[k])
                        for k in ("f", "b", "w", "bw")}

# The split the planner picks for the runtime: least simulated lockstep time, the faster schedule.
searches = {kind: lockstep_split(chain, S, microbatches=M, schedule=kind, layer_ops=ops)
            for kind in ("1f1b", "zb_h1", "1f1b_fb")}
kind = min(searches, key=lambda k: searches[k].time)
runtime_plan = searches[kind].counts
# The frozen-aware FLOP-balanced split (min-max over each stage's compiled work per microbatch: F + its backward).
class _C:  # a CostedLayer stand-in carrying the compiled total and the analytic memory
    def __init__(self, c, t): self.c, self.t = c, t
    def __getattr__(self, k): return getattr(self.c, k)
work = ops["f"] + ops["bw"]
planned = min_max_split([_C(c, t) for c, t in zip(chain, work)], S, microbatches=M, cost=lambda c: c.t)
uniform = uniform_split(n, S)

_OP_FLOPS = {}

def op_flops(ks, op):
    # One stage's op over its layers (kinds fixed: a straight-line program of the runtime's per-layer vjps), compiled.
    # Layers all have one shape, so the kinds decide it; the saved inputs and the cotangent are arguments.
    key = (tuple(ks), op)
    if key not in _OP_FLOPS:
        ps = [{"weights": jax.tree.map(lambda a, i=i: a[i], values)} for i in range(len(ks))]
        if op == OP_F:
            def run(ps, ins, g):
                h = ins[0]
                for p in ps:
                    h = layer_fn(p, h, None)
                return h
        else:
            dx_on, dw_on = {OP_B: (True, False), OP_W: (False, True), OP_BW: (True, True)}[op]
            def run(ps, ins, g):
                sink = []
                for p, k, xi in reversed(list(zip(ps, ks, ins))):
                    dq, dh = layer_grads(layer_fn, p, xi, g, None, dx=dx_on and k in (KIND_DX, KIND_DX_DW),
                                         dw=dw_on and k in (KIND_DW, KIND_DX_DW))
                    sink += list(dq or [])
                    g = g if dh is None else dh
                return g, sink
        _OP_FLOPS[key] = flops(run, ps, [x] * len(ks), x)
    return _OP_FLOPS[key]

def stage_program_flops(counts, schedule):
    # The step's per-stage FLOPs = the table's count of each op x that op's compiled FLOPs.
    layout = make_layout(counts, trainable)
    table = layout_schedule(layout, M, schedule).ops
    out = []
    for s_, c in enumerate(counts):
        ks = [int(k) for k in layout.kind[s_, :c]]
        col = table[:, s_]
        n_fb = float((col == OP_FB).sum())  # a paired tick: one forward and one fused backward
        out.append(sum(float((col == op).sum() + (n_fb if op in (OP_F, OP_BW) else 0)) * op_flops(ks, op)
                       for op in (OP_F, OP_B, OP_W, OP_BW) if (col == op).any() or (n_fb and op in (OP_F, OP_BW))))
    return out

def ratio(v):
    return max(v) / (sum(v) / len(v))

def predicted(counts, schedule):
    so = stage_ops(ops, counts)
    return simulate(so, M, schedule)

res = {}
for name, counts in (("planned", planned), ("runtime_plan", runtime_plan), ("uniform", uniform)):
    fl = stage_program_flops(counts, kind)
    sim = predicted(counts, kind)
    res[name] = {"split": list(counts), "stage_flops": fl, "ratio": ratio(fl), "simulated_time": sim.time,
                 "bubble_fraction": sim.bubble_fraction,
                 "simulated_time_1f1b": predicted(counts, "1f1b").time}
print(json.dumps({
    "layer_ops_compiled_flops": {"f": f, "b": b, "w": w, "bw": bw}, "analytic_over_compiled": analytic_vs_compiled,
    "schedule": kind, "planned_split": list(planned), "runtime_plan_split": list(runtime_plan),
    "uniform_split": list(uniform), "stage_flops_planned": res["planned"]["stage_flops"],
    "stage_flops_runtime_plan": res["runtime_plan"]["stage_flops"], "stage_flops_uniform": res["uniform"]["stage_flops"],
    "stage_flops_ratio_planned": res["planned"]["ratio"], "stage_flops_ratio_runtime_plan": res["runtime_plan"]["ratio"],
    "stage_flops_ratio_uniform": res["uniform"]["ratio"],
    "splits": res, "compile_layer_s": compile_layer_s,
    "config": {"stages": S, "microbatches": M, "frozen_layers": N_FROZEN, "trainable_layers": N_TRAIN,
               "d_model": D, "seq": SEQ, "microbatch_rows": MB, "layer": "LLM.stage_layer (Llama-style decoder)"}}))
"""


def _subprocess(code: str, devices: int, flags: str = "") -> dict:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {flags}".strip(),
               JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"measurement subprocess failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(quick: bool) -> dict:
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # (stages, microbatches, frozen layers, trainable layers, d_model, sequence, rows per microbatch): the LLM's
    # first half frozen, its second half trainable (partly frozen).
    cfg = (4, 8, 16, 16, 128, 64, 1) if quick else (4, 8, 16, 16, 256, 128, 1)
    return _subprocess(MEASURE.replace("REPO", repr(repo)).replace("CFG", repr(cfg)), 1)


# ----------------------------------------------------------------------------------------------------------------
# Timeline of the lockstep table: every tick as long as its slowest op.


def activation_rows(plan, name, table=None) -> int:
    """Rows of the runtime's activation pool on every device for the plan's runtime placement: its schedule's
    slots x the longest (virtual) stage's layers (a row is one saved layer input of a microbatch)."""
    from mllm_jax.parallel.schedule import schedule_for

    p = plan.runtime
    in_flight = plan.in_flight if p.schedule == "zb_v" else None
    sched = schedule_for(_plan_stage_ops(plan, name, table), plan.microbatches, p.schedule, None, in_flight,
                         slicing=p.slicing)
    return int(sched.act_slots * max(p.llm_stage_layers))


def draw_timeline(path, plan, name, table=None, plan_1f1b=None):
    """Our planned split of ``name`` in lockstep ticks under 1F1B (``plan_1f1b``'s split) and under the chosen
    schedule (each tick as long as its slowest op; the gaps are the bubbles)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mllm_jax.parallel.schedule import simulate as simulate_table, tick_costs

    colors = {OP_F: "tab:blue", OP_B: "tab:orange", OP_W: "tab:green", OP_BW: "tab:red", OP_FB: "tab:purple"}
    fig, axes = plt.subplots(2, 1, figsize=(12, 5), sharex=True)
    chosen = plan.runtime.schedule
    for ax, kind, p in zip(axes, ("1f1b", chosen), (plan_1f1b or plan, plan)):
        so = _plan_stage_ops(p, name, table)
        sim = simulate_table(so, plan.microbatches, kind)
        costs = tick_costs(sim.schedule, so)
        start = 0.0
        for t in range(costs.shape[0]):
            for s in range(costs.shape[1]):
                op = int(sim.schedule.ops[t, s])
                if op in colors and costs[t, s] > 0:
                    ax.barh(s, costs[t, s], left=start, color=colors[op], edgecolor="white", lw=0.2)
            start += costs[t].max()
        ax.set_yticks(range(costs.shape[1]))
        ax.set_ylabel("device")
        ax.invert_yaxis()
        ax.set_title(f"{name} LLM pipeline (ours, layers {list(p.runtime.llm_stage_layers)}), {kind} in lockstep "
                     f"ticks: {sim.time:.3f} s, bubble {sim.bubble_fraction:.2f} "
                     "(F blue, B orange, W green, BW red, F+BW purple)",
                     fontsize=8)
    axes[-1].set_xlabel("seconds (cost model)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plan_stage_ops(plan, name, table=None):
    """The planned split's per-stage op costs in seconds (the runtime costs the plan simulated)."""
    from mllm_jax.parallel.pipeline_plan import runtime_stage_ops, with_layer_costs

    cfg, tokens, feats = model_config(name)
    costs = pipeline_costs(cfg, text_tokens=1024, encoder_tokens=tokens, feature_tokens=feats)
    rt = (costs if table is None else with_layer_costs(costs, table)).runtime
    so = runtime_stage_ops(rt.llm, plan.runtime.llm_stage_layers, rt.head)
    return so.scaled(1.0 / (plan.tensor * plan.device_flops))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--png", default=None, help="timeline PNG (default: beside --out)")
    ap.add_argument("--costs", choices=("analytic", "compiled"), default="analytic",
                    help="per-layer costs: the analytic model, or compiled from the real layers for --target")
    ap.add_argument("--target", default="tpu:v5p:2x2x1",
                    help="--costs=compiled: the chip (targets.py; a TPU: the GPU back end has no cost analysis "
                         "without a device) whose compiler and roofline price the layers")
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of the nine models")
    ap.add_argument("--cache", default=None, help="--costs=compiled: a JSON file of compiled figures (resumable)")
    args = ap.parse_args()
    names = args.models.split(",")
    bad = [n for n in names if n not in MODELS]
    if bad:
        raise SystemExit(f"--models: unknown {bad}; the models are {list(MODELS)}")
    t0 = time.time()
    models, details, tables = {}, {}, {}
    device_flops, target, w_bw = DEVICE_FLOPS, None, None
    if args.costs == "compiled":
        from mllm_jax.train.targets import parse

        from mllm_jax.train.layer_costs import use_cache_file

        use_cache_file(args.cache)
        target = parse(args.target)
        device_flops = target.chip.peak_flops  # the table is roofline seconds x peak: plans report seconds
        for name in names:
            t1 = time.time()
            tables[name] = layer_cost_table(name, target)
            print(f"{name}: layer costs compiled for {target.topology} in {time.time() - t1:.1f} s", flush=True)
        w_bw = w_vs_bw(target)
    compile_s = time.time() - t0
    for name in names:
        plan = predicted(name, table=tables.get(name), device_flops=device_flops)
        ours, cs, meg = plan.runtime, plan.cornstarch, plan.megatron_like
        outside_plan = predicted(name, table=tables.get(name), device_flops=device_flops, encoders="outside")
        # At 1F1B's activation memory: the planner restricted to each schedule that can hold no more saved layer
        # inputs than 1F1B, its split chosen again for each; a plan whose activation pool (measured on its table)
        # is larger than 1F1B's plan's is dropped, and the fastest of the rest kept.
        one_plan = predicted(name, schedule="1f1b", table=tables.get(name), device_flops=device_flops)
        rows_1f1b = activation_rows(one_plan, name, tables.get(name))
        # The one-chunk schedules on their own split and on 1F1B's (their own may have a longer stage, whose pool
        # rows every device then holds).
        eq_cands = [one_plan] + [predicted(name, schedule=k, table=tables.get(name), device_flops=device_flops,
                                           stage_layers=layers)
                                 for k in EQUAL_MEMORY_SCHEDULES if k not in ("1f1b", "zb_v")
                                 for layers in (None, one_plan.runtime.llm_stage_layers)]
        # zb_v paced by its admitted microbatches: the most that keep its pool within 1F1B's (chunks of a V are
        # half a stage rounded up, so at 2 x S slots the pool can be a few rows larger).
        for n in range(one_plan.stages, 0, -1):
            zb_v = predicted(name, schedule="zb_v", table=tables.get(name), device_flops=device_flops, in_flight=n)
            if activation_rows(zb_v, name, tables.get(name)) <= rows_1f1b:
                eq_cands.append(zb_v)
                break
        eq_cands = [p for p in eq_cands if activation_rows(p, name, tables.get(name)) <= rows_1f1b]
        eq_plan = min(eq_cands, key=lambda p: p.runtime.runtime_time)
        eq = eq_plan.runtime
        # Cornstarch's placement at 1F1B's memory: the faster of its 1F1B and ZB-H1 tables.
        cs_eq = min(p.cornstarch.runtime_time for p in eq_cands if p.runtime.schedule in ("1f1b", "zb_h1"))
        models[name] = {
            # Every time simulated under our runtime's lockstep schedule, with the same per-layer costs.
            "ours": ours.runtime_time,
            "cornstarch": cs.runtime_time,
            "megatron_like": meg.runtime_time,
            "schedule": ours.schedule,
            "bubble_fraction": ours.bubble_fraction,
            "bubble_fraction_1f1b": ours.bubble_fraction_1f1b,
            # The best plan at 1F1B's activation memory, and 1F1B's bubble on that plan's stages and costs.
            "ours_equal_memory": eq.runtime_time,
            "schedule_equal_memory": eq.schedule,
            "bubble_fraction_equal_memory": eq.bubble_fraction,
            "bubble_fraction_1f1b_equal_memory_stages": eq.bubble_fraction_1f1b,
            # The runtime's activation pool (rows of saved layer inputs per device): the plan's and 1F1B's plan's.
            "activation_rows_equal_memory": activation_rows(eq_plan, name, tables.get(name)),
            "activation_rows_1f1b": rows_1f1b,
            # Both at 1F1B's memory: Cornstarch's placement under the same restricted schedules.
            "cornstarch_equal_memory": cs_eq,
            "speedup_vs_cornstarch_equal_memory": cs_eq / eq.runtime_time,
        }
        details[name] = {
            "speedup_vs_cornstarch": cs.runtime_time / ours.runtime_time,
            "speedup_vs_megatron_like": meg.runtime_time / ours.runtime_time,
            "ours_llm_stage_layers": list(ours.llm_stage_layers),
            "ours_encoder_time": ours.encoder_time,
            # The encoders' share of our step left before the pipeline (spread over every device), after the
            # planner put the encodes that fit into the pipeline's idle warm-up ticks (``encoders_in_bubbles`` of
            # the microbatches; ParallelConfig.pipeline_encoders), and what that share was with every encoder
            # outside.
            "encoder_share": ours.encoder_time / ours.runtime_time,
            "encoders_in_bubbles": ours.encoders_in_bubbles,
            "ours_encoders_outside": outside_plan.runtime.runtime_time,
            "encoder_share_outside": outside_plan.runtime.encoder_time / outside_plan.runtime.runtime_time,
            "ours_runtime_1f1b": ours.runtime_time_1f1b,
            # Activation slots (microbatches of saved layer inputs; of a chunk's under zb_v / interleaved) the
            # busiest device holds: ours, and 1F1B's; and the pool's rows (slots x the longest stage's layers).
            "ours_activation_slots": max(schedule_in_flight(plan.stages, plan.microbatches, ours.schedule)),
            "activation_slots_1f1b": max(schedule_in_flight(plan.stages, plan.microbatches, "1f1b")),
            "ours_activation_rows": activation_rows(plan, name, tables.get(name)),
            "cornstarch_schedule": cs.schedule,
            "cornstarch_bubble_fraction": cs.bubble_fraction,
            "cornstarch_llm_stage_layers": list(cs.llm_stage_layers),
            "megatron_schedule": meg.schedule,
            "megatron_bubble_fraction": meg.bubble_fraction,
            "megatron_llm_stage_layers": list(meg.llm_stage_layers),
            "megatron_encoder_stage_layers": {k: list(v) for k, v in meg.encoder_stage_layers.items()},
            "stages": {"ours": plan.stages, "cornstarch": len(cs.all_stage_costs),
                       "megatron_like": len(meg.all_stage_costs)},
            # For reference, the asynchronous 1F1B formula (M - 1) x max stage + sum of stages: what Cornstarch's
            # own (event-driven) runtime would take with its placement, and our plan by the same formula.
            "cornstarch_async_formula": cs.predicted_time,
            "ours_async_formula": plan.chosen.predicted_time,
            "ours_runtime_vs_cornstarch_async_formula": cs.predicted_time / ours.runtime_time,
            "uniform_runtime": plan.uniform.runtime_time,
            "best_own_stages_runtime": min((p.runtime_time for p in plan.alternatives if not p.encoders_outside),
                                           default=None),
            "lockstep_search_exhaustive": plan.lockstep_search.exhaustive,
        }
        print(f"{name}: ours {ours.runtime_time:.3f} s ({ours.schedule}, {list(ours.llm_stage_layers)}, bubble "
              f"{ours.bubble_fraction:.3f})  cornstarch {cs.runtime_time:.3f} s  megatron-like "
              f"{meg.runtime_time:.3f} s", flush=True)
    png = args.png or os.path.splitext(args.out)[0] + "_timeline.png"
    drawn = "VALM-L" if "VALM-L" in names else names[-1]
    draw_timeline(png, predicted(drawn, table=tables.get(drawn), device_flops=device_flops), drawn, tables.get(drawn),
                  predicted(drawn, schedule="1f1b", table=tables.get(drawn), device_flops=device_flops))
    measured = measure(args.quick)
    speed = [d["speedup_vs_cornstarch"] for d in details.values()]
    result = {
        "benchmark": "pipeline",
        "quick": args.quick,
        "models_run": names,
        "predictor": "runtime_schedule",
        "costs": args.costs,
        "cost_source": {"a": "analytic (parallel.cost_model)" if target is None else
                        f"compiled per-layer ops ({target.topology} cost_analysis, roofline on its chip: "
                        "mllm_jax.train.layer_costs)",
                        "b": "compiled per-layer ops (host cost_analysis)"},
        "layer_costs": None if target is None else {
            "target": target.topology, "compile_s": compile_s, "w_vs_bw": w_bw,
            "figures": {n: t.figures for n, t in tables.items()}},
        "settings": {"microbatches": 24, "tensor": 2, "text_tokens": 1024, "device_flops": device_flops,
                     "frozen": "encoders and LLM frozen, projectors trainable", "remat": True},
        "models": models,
        "model_details": details,
        "faster_than_cornstarch": sum(v > 1.0 for v in speed),
        "faster_than_cornstarch_equal_memory": sum(m["speedup_vs_cornstarch_equal_memory"] > 1.0
                                                   for m in models.values()),
        "bubble_below_1f1b_at_equal_memory": sum(m["bubble_fraction_equal_memory"] <
                                                 m["bubble_fraction_1f1b_equal_memory_stages"]
                                                 for m in models.values()),
        "speedup_vs_cornstarch_range": [min(speed), max(speed)],
        "encoder_share_max": max(d["encoder_share"] for d in details.values()),
        "encoder_share_outside_max": max(d["encoder_share_outside"] for d in details.values()),
        # Our plan with encodes in the bubbles over the same plan with every encoder outside (>= 1).
        "speedup_from_encoders_in_bubbles": [min(d["ours_encoders_outside"] / models[n]["ours"]
                                                 for n, d in details.items()),
                                             max(d["ours_encoders_outside"] / models[n]["ours"]
                                                 for n, d in details.items())],
        "models_with_encoders_in_bubbles": sum(d["encoders_in_bubbles"] > 0 for d in details.values()),
        **{k: measured[k] for k in ("stage_flops_ratio_planned", "stage_flops_ratio_runtime_plan",
                                    "stage_flops_ratio_uniform")},
        "measured": measured,
        "timeline_png": png,
        "wall_s": time.time() - t0,
    }
    report(result, args.out)


if __name__ == "__main__":
    main()
