"""Workload-balanced microbatch assignment vs random and sequential (Entrain-style), on a LLaVA-like distribution.

Samples: 0..6 images (576 tokens each, CLIP ViT-L/14 at 336 px, frozen) and long-tailed (log-normal) text lengths;
work per sample from mllm_jax.parallel.cost_model through mllm_jax.data.datasets.WorkloadModel (7B Llama LLM). A global
batch is assigned to data ranks x microbatches, each microbatch packed into rows of a fixed length (exact capacity
check). Reported, averaged over trials: the coefficient of variation (CV) of per-microbatch workload (encoder + LLM
FLOPs, and each objective alone), and the predicted step time: max over ranks of encoder work + the 1F1B formula of the LLM
work over the pipeline stages (sum/P + (P-1) max/P).

A second family, ``variable_resolution`` (benchmarks/_variable_resolution.py): Qwen2.5-VL-7B (frozen tower) on images
at their own size from a long-tailed distribution and some videos, each sample priced from its instances' real patch
grids; a microbatch must pack its text into the token rows and its instances' patches into ``--patch_rows`` rows of
the tower's ``patches_per_row`` (exact first-fit check).

Final JSON line (also written to --out): cv_random, cv_sequential, cv_balanced, cv_reduction (random / balanced),
predicted_speedup (random / balanced step time), predicted_speedup_vs_sequential, ... (the LLaVA family), and
"variable_resolution": the same keys for that family.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import _variable_resolution as varres  # noqa: E402
from benchmarks._report import report  # noqa: E402
from mllm_jax.config import LLMConfig, ModelConfig, ProjectorConfig, VisionConfig  # noqa: E402
from mllm_jax.data.datasets import (Capacity, WorkloadModel, assign, coefficient_of_variation, microbatch_loads,  # noqa
                               pack_rows, predicted_step_time)
from mllm_jax.data.processor.native_vision import NativeVisionProcessor  # noqa: E402

IMAGE_TOKENS = 576
IMAGE_PROBS = (0.30, 0.35, 0.12, 0.08, 0.06, 0.05, 0.04)  # P(0..6 images)


def llava_7b() -> ModelConfig:
    vit_l = VisionConfig(image_size=336, patch_size=14, d_model=1024, n_layers=24, n_heads=16, d_ff=4096,
                         select_layer=-2)
    return ModelConfig(llm=LLMConfig(), encoders={"vision": vit_l}, projectors={"vision": ProjectorConfig()},
                       placeholder_ids={"vision": 32000}, trainable={"encoders/vision": False})


def synthetic_batch(n: int, rng: np.random.Generator, max_text: int):
    images = rng.choice(len(IMAGE_PROBS), n, p=IMAGE_PROBS)
    text = np.minimum(rng.lognormal(mean=5.0, sigma=1.0, size=n).astype(int) + 16, max_text)
    return text + IMAGE_TOKENS * images, images


def llava_family(args, rng, n, model):
    """(workloads [n, 2], Capacity) of one LLaVA-like global batch."""
    tokens, images = synthetic_batch(n, rng, args.seq_len - IMAGE_TOKENS * 6)
    work = model.workloads(tokens, [{"vision": int(k)} for k in images])
    cap = Capacity(tokens, images[:, None], max_tokens=args.rows * args.seq_len, max_instances=6 * 16,
                   fits=lambda ix, t=tokens: pack_rows([t[i] for i in ix], args.rows, args.seq_len) is not None)
    return work, cap


def variable_resolution_family(args, rng, n, model):
    """(workloads [n, 2], Capacity) of one global batch of native-resolution images and videos: the text must pack
    into the token rows and the instances' patches into the patch rows."""
    tower = model.config.encoders["vision"]
    proc = NativeVisionProcessor.for_model(tower)
    samples = varres.draw_samples(rng, n, proc, max_tokens=args.seq_len, max_patches=tower.patches_per_row)
    tokens = np.asarray([t + sum(i.tokens for i in insts) for t, insts in samples])
    patches = [[i.patches for i in insts] for _, insts in samples]
    work = model.workloads(tokens, [{"vision": [i.grid_thw for i in insts]} for _, insts in samples])
    rows, per_row = args.patch_rows, tower.patches_per_row

    def fits(ix):
        return (pack_rows([tokens[i] for i in ix], args.rows, args.seq_len) is not None
                and pack_rows([p for i in ix for p in patches[i]], rows, per_row) is not None)

    cap = Capacity(tokens, np.asarray([sum(p) for p in patches])[:, None], max_tokens=args.rows * args.seq_len,
                   max_instances=rows * per_row, fits=fits)
    return work, cap


FAMILIES = {"llava": (llava_7b, llava_family), "variable_resolution": (varres.qwen25vl_7b, variable_resolution_family)}


def measure(family: str, args) -> dict:
    """Balanced vs random vs sequential assignment over ``args.trials`` global batches of ``family``."""
    make_model, make_batch = FAMILIES[family]
    n = args.ranks * args.microbatches * args.samples_per_microbatch
    model = WorkloadModel(make_model())
    methods = ("random", "sequential", "balanced")
    acc = {m: {"cv": [], "cv_encoder": [], "cv_llm": [], "time": [], "assign_s": []} for m in methods}
    for trial in range(args.trials):
        rng = np.random.default_rng(trial)
        work, cap = make_batch(args, rng, n, model)
        for m in methods:
            t0 = time.perf_counter()
            a = assign(work, num_ranks=args.ranks, num_microbatches=args.microbatches, method=m, seed=trial,
                       capacity=cap)
            acc[m]["assign_s"].append(time.perf_counter() - t0)
            assert sorted(i for r in a for mb in r for i in mb) == list(range(n)), "a sample was lost or repeated"
            loads = microbatch_loads(a, work)
            acc[m]["cv"].append(coefficient_of_variation(loads.sum(-1)))
            acc[m]["cv_encoder"].append(coefficient_of_variation(loads[..., 0]))
            acc[m]["cv_llm"].append(coefficient_of_variation(loads[..., 1]))
            acc[m]["time"].append(predicted_step_time(loads, pipeline_stages=args.pipeline_stages))
    mean = {m: {k: float(np.mean(v)) for k, v in d.items()} for m, d in acc.items()}
    for m in methods:
        print(f"{family} {m:>10}: CV total {mean[m]['cv']:.4f}  encoder {mean[m]['cv_encoder']:.4f}  "
              f"LLM {mean[m]['cv_llm']:.4f}  predicted step {mean[m]['time'] / 1e15:.3f} PFLOP  "
              f"assign {mean[m]['assign_s'] * 1e3:.1f} ms")
    result = {
        "benchmark": "microbatch_balance", "family": family,
        "ranks": args.ranks, "microbatches": args.microbatches, "samples_per_batch": n,
        "pipeline_stages": args.pipeline_stages, "trials": args.trials,
        "cv_random": mean["random"]["cv"], "cv_sequential": mean["sequential"]["cv"],
        "cv_balanced": mean["balanced"]["cv"],
        "cv_reduction": mean["random"]["cv"] / max(mean["balanced"]["cv"], 1e-12),
        "cv_reduction_vs_sequential": mean["sequential"]["cv"] / max(mean["balanced"]["cv"], 1e-12),
        "cv_encoder": {m: mean[m]["cv_encoder"] for m in methods},
        "cv_llm": {m: mean[m]["cv_llm"] for m in methods},
        "predicted_step_time": {m: mean[m]["time"] for m in methods},
        "predicted_speedup": mean["random"]["time"] / mean["balanced"]["time"],
        "predicted_speedup_vs_sequential": mean["sequential"]["time"] / mean["balanced"]["time"],
        "assign_ms": {m: 1e3 * mean[m]["assign_s"] for m in methods},
        "target_cv_reduction": 5.0,
    }
    result["meets_target"] = bool(result["cv_reduction"] >= 5.0)
    return result


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="")
    ap.add_argument("--quick", action="store_true", help="fewer, smaller batches (seconds)")
    ap.add_argument("--ranks", type=int, default=8)
    ap.add_argument("--microbatches", type=int, default=4)
    ap.add_argument("--samples_per_microbatch", type=int, default=16)
    ap.add_argument("--rows", type=int, default=4, help="packed rows per microbatch")
    ap.add_argument("--seq_len", type=int, default=8192)
    ap.add_argument("--patch_rows", type=int, default=8,
                    help="variable_resolution: packed patch rows per microbatch (of the tower's patches_per_row)")
    ap.add_argument("--pipeline_stages", type=int, default=4)
    ap.add_argument("--trials", type=int, default=10)
    args = ap.parse_args(argv)
    if args.quick:
        args.ranks, args.microbatches, args.trials = 4, 4, 3
    result = measure("llava", args)
    result["variable_resolution"] = measure("variable_resolution", args)
    report(result, args.out)
    return result


if __name__ == "__main__":
    main()
