"""Frozen-aware pipeline planning: predicted iteration time of our plan vs Cornstarch's placement and a frozen-unaware
(Megatron-like) placement for the nine MLLMs of Cornstarch's evaluation, and a measured balance check on 8 fake CPU
devices with a tiny model whose frozen and trainable layers mix.

  python benchmarks/pipeline.py --out /tmp/pipeline.json [--quick] [--png /tmp/pipeline_timeline.png]

(a) is analytic (parallel.cost_model over mllm_jax.costs' layers of public architecture shapes; communication not
modelled): "ours", "cornstarch", "megatron_like" on the common async 1F1B formula; model_details adds the step time our lockstep runtime
takes with the split PipelinePlan.runtime chooses for it, and with the uniform split. (b) runs in subprocesses, on a
stack whose first half is frozen and second half trainable: per-stage FLOPs on 8 fake devices (4 stages) from
cost_analysis of the straight-line per-stage program (forward keeping each layer's input, then each layer's vjp
branch, for all microbatches); step time of the pipeline runtime on 2 fake devices with one XLA thread each
(2 stages; on a 2-core machine each stage gets a core), the split the planner picks for the runtime's lockstep
ticks vs the uniform split, timed alternately in one run, medians, beside the planner's simulated times of both and
the machine's load average; and the compute cost of padded slots (one stage, 2 active slots padded to 8 vs
unpadded).
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
from mllm_jax.parallel.pipeline_plan import plan_pipeline  # noqa: E402


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
    )
    return cfg, tokens, feats


def predicted(name, microbatches=24, tensor=2):
    cfg, tokens, feats = model_config(name)
    llm_s, vis_s, aud_s = MODELS[name][3]
    megatron = {"llm": llm_s, **({"vision": vis_s} if vis_s else {}), **({"audio": aud_s} if aud_s else {})}
    n_enc = len(cfg.encoders)
    stages = 5 + n_enc  # Cornstarch's (5, 1, 1): five LLM stages and one per encoder
    cornstarch = {"llm": 5, **{k: 1 for k in cfg.encoders}}
    plan = plan_pipeline(
        pipeline_costs(cfg, text_tokens=1024, encoder_tokens=tokens, feature_tokens=feats),
        ParallelConfig(pipeline=stages, tensor=tensor, microbatches=microbatches),
        device_flops=DEVICE_FLOPS,
        cornstarch_stages=cornstarch,
        megatron_stages=megatron,
    )
    return plan


# ----------------------------------------------------------------------------------------------------------------
# (b) measured on fake CPU devices (runs in a subprocess).

MEASURE = r"""
import json, sys
import numpy as np
import jax, jax.numpy as jnp
sys.path.insert(0, REPO)
from mllm_jax.parallel.cost_model import Layer, cost_chain
from mllm_jax.parallel.pipeline_plan import lockstep_split, min_max_split, uniform_split
from mllm_jax.parallel.pipeline import make_layout, KIND_NONE, KIND_DX, KIND_DW, KIND_DX_DW

S, M, n_frozen, n_train, D, MB, REPS = CFG
n = n_frozen + n_train
trainable = np.array([False] * n_frozen + [True] * n_train)

def layer_fn(p, x, aux):
    return jnp.tanh(x @ p["w"]) + x

def loss_fn(lp, y, aux):
    return jnp.sum((y @ lp["v"]) ** 2)

# Cost model of this stack: every layer is one GEMM; the runtime rematerialises per layer.
layers = [Layer(name=str(i), module="m", weight_flops=2.0 * MB * D * D, trainable=bool(t), params=D * D)
          for i, t in enumerate(trainable)]
chain, _ = cost_chain(layers, remat=True)
# The frozen-aware FLOPs-balanced plan (exact min-max over stage costs) and the split our lockstep runtime prefers
# (simulated tick by tick); both are reported, the former under the issue's key.
planned = min_max_split(chain, S, microbatches=M)
runtime_plan = lockstep_split(chain, S, microbatches=M).counts
uniform = uniform_split(n, S)

def stage_program(kinds, M):
    # Straight-line program of one stage for all M microbatches as the runtime runs it: the forward keeps each
    # layer's input; the backward is each layer's vjp branch (which recomputes that layer: remat per layer).
    def run(ps, x, g):
        for m in range(M):
            h = x[m]
            inputs = []
            for p in ps:
                inputs.append(h)
                h = layer_fn(p, h, None)
            if all(k == KIND_NONE for k in kinds):
                g = g + h.sum()
                continue
            inputs = list(jax.lax.optimization_barrier(inputs))  # a later tick: keep XLA from CSE the recompute
            dy = h
            for p, k, xi in reversed(list(zip(ps, kinds, inputs))):
                if k == KIND_DX:
                    _, vjp = jax.vjp(lambda hh: layer_fn(p, hh, None), xi); (dy,) = vjp(dy)
                elif k == KIND_DW:
                    _, vjp = jax.vjp(lambda q: layer_fn(q, xi, None), p); (dp,) = vjp(dy); g = g + dp["w"].sum()
                elif k == KIND_DX_DW:
                    _, vjp = jax.vjp(lambda q, hh: layer_fn(q, hh, None), p, xi); dp, dy = vjp(dy); g = g + dp["w"].sum()
            g = g + dy.sum()
        return g
    return run

def stage_flops(counts):
    layout = make_layout(counts, trainable)
    out = []
    for s, c in enumerate(counts):
        kinds = [int(k) for k in layout.kind[s, :c]]
        ps = [{"w": jnp.zeros((D, D))} for _ in range(c)]
        x = jnp.zeros((M, MB, D))
        comp = jax.jit(stage_program(kinds, M)).lower(ps, x, jnp.float32(0)).compile()
        ca = comp.cost_analysis()
        ca = ca[0] if isinstance(ca, (list, tuple)) else ca
        out.append(float(ca["flops"]))
    return out

def ratio(v):
    return max(v) / (sum(v) / len(v))

fp, fu, fr = stage_flops(planned), stage_flops(uniform), stage_flops(runtime_plan)
print(json.dumps({"planned_split": list(planned), "uniform_split": list(uniform),
                  "runtime_plan_split": list(runtime_plan),
                  "stage_flops_planned": fp, "stage_flops_uniform": fu, "stage_flops_runtime_plan": fr,
                  "stage_flops_ratio_planned": ratio(fp), "stage_flops_ratio_uniform": ratio(fu),
                  "stage_flops_ratio_runtime_plan": ratio(fr),
                  "config": {"stages": S, "microbatches": M, "frozen_layers": n_frozen, "trainable_layers": n_train,
                             "width": D, "microbatch_rows": MB}}))
"""

# Step time: 2 stages on 2 fake devices, one XLA CPU thread each, so on a 2-core machine each stage has a core and
# the step time is set by the slowest stage (with 8 fake devices on 2 cores it measures the total work instead).
# Planned and uniform splits are compiled side by side and timed alternately; medians over the repeats. Also the
# cost of padding: one stage's forward + backward with c active slots padded to L_max vs unpadded.
STEP = r"""
import json, os, sys, time
import numpy as np
import jax, jax.numpy as jnp
sys.path.insert(0, REPO)
from jax.sharding import AxisType
from mllm_jax.parallel.cost_model import Layer, cost_chain
from mllm_jax.parallel.pipeline_plan import lockstep_split, lockstep_time, min_max_split, runtime_stage_costs, uniform_split
from mllm_jax.parallel.pipeline import KIND_DX_DW, _stage_backward, _stage_forward, pipeline_value_and_grad
load_before = os.getloadavg()

S, M, n_frozen, n_train, D, MB, REPS = CFG
n = n_frozen + n_train
trainable = np.array([False] * n_frozen + [True] * n_train)

def layer_fn(p, x, aux):
    return jnp.tanh(x @ p["w"]) + x

def loss_fn(lp, y, aux):
    return jnp.sum((y @ lp["v"]) ** 2)

# Cost model in layer forwards: every layer one GEMM of cost 1 (dX and dW each about one forward).
layers = [Layer(name=str(i), module="m", weight_flops=1.0, trainable=bool(t), params=D * D)
          for i, t in enumerate(trainable)]
chain, _ = cost_chain(layers, remat=True)
search = lockstep_split(chain, S, microbatches=M)
splits = {"planned": search.counts, "uniform": uniform_split(n, S)}
mesh = jax.make_mesh((S,), ("pipeline",), axis_types=(AxisType.Explicit,), devices=jax.devices()[:S])
key = jax.random.split(jax.random.key(0), 3)
params = {"w": jax.random.normal(key[0], (n, D, D)) / np.sqrt(D)}
lp = {"v": jax.random.normal(key[1], (D, 4)) / np.sqrt(D)}
x = jax.random.normal(key[2], (M, MB, D))

def timed(f, *args):
    t = time.perf_counter(); jax.block_until_ready(f(*args)); return time.perf_counter() - t

with jax.set_mesh(mesh):
    fns = {name: jax.jit(lambda p, lp, x, c=counts: pipeline_value_and_grad(
        layer_fn, p, x, loss_fn=loss_fn, loss_params=lp, stage_layers=c, mesh=mesh, trainable_layers=trainable))
        for name, counts in splits.items()}
    for f in fns.values():
        jax.block_until_ready(f(params, lp, x))
    times = {name: [] for name in fns}
    for _ in range(REPS):
        for name, f in fns.items():
            times[name].append(timed(f, params, lp, x))

# Padding: the stage loops over its active slots only, so c active of L_max slots should cost what c of c costs.
# The gradient accumulator and the saved-input buffer are carried across the step in the runtime, so here they are
# passed in and donated.
def stage(params_L, gacc, saved, n_active, x):
    y, saved = _stage_forward(layer_fn, params_L, n_active, x, None, saved=saved, slot=0)
    kinds = jnp.full((params_L["w"].shape[0],), KIND_DX_DW, jnp.int32)
    gacc, dx = _stage_backward(layer_fn, params_L, kinds, n_active, 0, saved, 0, y, None, gacc)
    return gacc, saved, dx

c, L_max = 2, 8
f_stage = jax.jit(stage, donate_argnums=(1, 2))
pad = {}
for slots in (c, L_max):
    p = {"w": params["w"][:slots]}
    g = jax.tree.map(jnp.zeros_like, p)
    buf = jnp.zeros((1, slots + 1) + x.shape[1:])
    g, buf, _ = jax.block_until_ready(f_stage(p, g, buf, c, x[0]))
    ts = []
    for _ in range(4 * REPS):
        t = time.perf_counter(); g, buf, dx = jax.block_until_ready(f_stage(p, g, buf, c, x[0]))
        ts.append(time.perf_counter() - t)
    pad[slots] = float(np.median(ts))

# The planner's simulation of the runtime (parallel.pipeline_plan): forward op = the stage's layer forwards,
# backward op = its layers' remat vjps (f + dX and/or dW; 0 for the frozen prefix); ticks in lockstep, each as long
# as its slowest op. The min-max split of the async 1F1B formula, simulated the same way, for comparison.
def lockstep_model(counts):
    F, B = runtime_stage_costs(chain, counts)
    return lockstep_time(F, B, M), F, B

splits_sim = dict(splits, minmax_formula=min_max_split(chain, S, microbatches=M))
model = {name: lockstep_model(c) for name, c in splits_sim.items()}
med = {k: float(np.median(v)) for k, v in times.items()}
load_after = os.getloadavg()
print(json.dumps({"planned_split": list(splits["planned"]), "uniform_split": list(splits["uniform"]),
                  "step_time_planned_s": med["planned"], "step_time_uniform_s": med["uniform"],
                  "step_times_planned_s": times["planned"], "step_times_uniform_s": times["uniform"],
                  "step_time_ratio_uniform_over_planned": med["uniform"] / med["planned"],
                  "minmax_formula_split": list(splits_sim["minmax_formula"]),
                  "lockstep_model_layer_forwards": {k: v[0] for k, v in model.items()},
                  "lockstep_model_ratio_uniform_over_planned": model["uniform"][0] / model["planned"][0],
                  "lockstep_model_stage_ops": {k: {"forward": v[1], "backward": v[2]} for k, v in model.items()},
                  "lockstep_search": {"evaluated": search.evaluated, "exhaustive": search.exhaustive,
                                      "dp_split": list(search.dp_counts), "dp_time": search.dp_time},
                  "load_average_1min_before_after": [load_before[0], load_after[0]], "cpu_count": os.cpu_count(),
                  "padding": {"active_slots": c, "padded_to": L_max, "stage_time_unpadded_s": pad[c],
                              "stage_time_padded_s": pad[L_max], "padded_over_unpadded": pad[L_max] / pad[c]},
                  "config": {"stages": S, "devices": S, "microbatches": M, "frozen_layers": n_frozen,
                             "trainable_layers": n_train, "width": D, "microbatch_rows": MB, "repeats": REPS}}))
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
    # (stages, microbatches, frozen layers, trainable layers, width, rows per microbatch, repeats): the LLM's first
    # half frozen, its second half trainable (a typical MLLM fine-tuning recipe).
    flops_cfg = (4, 4, 8, 8, 64, 16, 3) if quick else (4, 8, 12, 12, 256, 64, 5)
    flops = _subprocess(MEASURE.replace("REPO", repr(repo)).replace("CFG", repr(flops_cfg)), 8)
    step_cfg = (2, 4, 8, 8, 128, 32, 5) if quick else (2, 8, 12, 12, 256, 64, 11)
    step = _subprocess(STEP.replace("REPO", repr(repo)).replace("CFG", repr(step_cfg)), 2,
                       "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
    return {"flops": flops, "step_time": step, **{k: flops[k] for k in ("stage_flops_ratio_planned",
                                                                       "stage_flops_ratio_uniform")},
            "step_time_ratio_uniform_over_planned": step["step_time_ratio_uniform_over_planned"]}


# ----------------------------------------------------------------------------------------------------------------
# Timeline of the 1F1B schedule with per-stage op durations (event simulation over the table's op order).


def simulate(stage_f, stage_b, microbatches):
    from mllm_jax.parallel.pipeline import OP_BWD, OP_FWD, stage_op_order

    S = len(stage_f)
    orders = stage_op_order(S, microbatches)
    end = {}
    free = [0.0] * S
    pos = [0] * S
    events = []
    while any(pos[s] < len(orders[s]) for s in range(S)):
        progressed = False
        for s in range(S):
            if pos[s] >= len(orders[s]):
                continue
            op, m = orders[s][pos[s]]
            dep = (OP_FWD, s - 1, m) if op == OP_FWD and s > 0 else None
            if op == OP_BWD:
                dep = (OP_FWD, s, m) if s == S - 1 else (OP_BWD, s + 1, m)
            if dep is not None and dep not in end:
                continue
            start = max(free[s], end.get(dep, 0.0))
            dur = stage_f[s] if op == OP_FWD else stage_b[s]
            end[(op, s, m)] = free[s] = start + dur
            events.append((s, op, m, start, dur))
            pos[s] += 1
            progressed = True
        assert progressed
    return events, max(free)


def draw_timeline(path, plan, name, microbatches):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mllm_jax.costs import model_costs
    from mllm_jax.parallel.pipeline import OP_FWD
    from mllm_jax.parallel.pipeline_plan import split_chain

    cfg, tokens, feats = model_config(name)
    costs = model_costs(cfg, text_tokens=1024, encoder_tokens=tokens, feature_tokens=feats)
    fig, axes = plt.subplots(2, 1, figsize=(12, 5), sharex=True)
    for ax, placement in zip(axes, (plan.chosen, plan.uniform)):
        pieces = split_chain(costs.llm, placement.llm_stage_layers)
        pieces[0] = [costs.embed] + pieces[0]
        pieces[-1] = pieces[-1] + [costs.head]
        scale = plan.tensor * plan.device_flops
        f = [sum(c.fwd for c in p) / scale for p in pieces]
        b = [sum(c.bwd for c in p) / scale for p in pieces]
        events, total = simulate(f, b, microbatches)
        for s, op, m, start, dur in events:
            ax.barh(s, dur, left=start, color="tab:blue" if op == OP_FWD else "tab:orange", edgecolor="white", lw=0.3)
        ax.set_yticks(range(len(f)))
        ax.set_ylabel("stage")
        ax.invert_yaxis()
        ax.set_title(f"{name} LLM pipeline, {placement.name}: layers {list(placement.llm_stage_layers)}, "
                     f"{total:.3f} s (blue F, orange B)", fontsize=9)
    axes[-1].set_xlabel("seconds (cost model)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--png", default=None, help="timeline PNG (default: beside --out)")
    args = ap.parse_args()
    t0 = time.time()
    models = {}
    details = {}
    for name in MODELS:
        plan = predicted(name)
        models[name] = {
            "ours": plan.chosen.predicted_time,
            "cornstarch": plan.cornstarch.predicted_time,
            "megatron_like": plan.megatron_like.predicted_time,
        }
        details[name] = {
            "ours_placement": plan.chosen.name,
            "ours_llm_stage_layers": list(plan.chosen.llm_stage_layers),
            "ours_balance": plan.chosen.balance,
            "cornstarch_llm_stage_layers": list(plan.cornstarch.llm_stage_layers),
            "megatron_llm_stage_layers": list(plan.megatron_like.llm_stage_layers),
            "stages": {"ours": plan.stages, "cornstarch": len(plan.cornstarch.all_stage_costs),
                       "megatron_like": len(plan.megatron_like.all_stage_costs)},
            "speedup_vs_cornstarch": plan.cornstarch.predicted_time / plan.chosen.predicted_time,
            "speedup_vs_megatron_like": plan.megatron_like.predicted_time / plan.chosen.predicted_time,
            # Our runtime runs lockstep ticks (parallel.pipeline_plan.lockstep_time), encoders outside.
            "ours_runtime_lockstep": plan.runtime.runtime_time,
            "ours_runtime_llm_stage_layers": list(plan.runtime.llm_stage_layers),
            "uniform_runtime_lockstep": plan.uniform.runtime_time,
            "formula_split_runtime_lockstep": plan.chosen.runtime_time if plan.chosen.encoders_outside else None,
            "lockstep_search_exhaustive": plan.lockstep_search.exhaustive,
        }
        print(f"{name}: ours {models[name]['ours']:.3f} s ({plan.chosen.name}, {list(plan.chosen.llm_stage_layers)})"
              f"  cornstarch {models[name]['cornstarch']:.3f} s  megatron-like {models[name]['megatron_like']:.3f} s",
              flush=True)
    png = args.png or os.path.splitext(args.out)[0] + "_timeline.png"
    draw_timeline(png, predicted("VALM-L"), "VALM-L", 24)
    measured = measure(args.quick)
    result = {
        "benchmark": "pipeline",
        "quick": args.quick,
        "settings": {"microbatches": 24, "tensor": 2, "text_tokens": 1024, "device_flops": DEVICE_FLOPS,
                     "frozen": "encoders and LLM frozen, projectors trainable", "remat": True},
        "models": models,
        "model_details": details,
        **{k: measured[k] for k in ("stage_flops_ratio_planned", "stage_flops_ratio_uniform",
                                    "step_time_ratio_uniform_over_planned")},
        "measured": measured,
        "timeline_png": png,
        "wall_s": time.time() - t0,
    }
    report(result, args.out)


if __name__ == "__main__":
    main()
