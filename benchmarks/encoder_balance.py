"""Encoder work per device, row-bound vs balanced, at 8..256 devices; and a frozen encoder's step with and without the
feature cache against a text-only step of the same token count (CPU), in one run.

Part 1 (host only, the planner): each device holds ``--samples_per_device`` samples with a long-tailed number of
images (0-8, ``IMAGE_PROBS``); a tenth of the samples are videos instead, 1-4 chunks of 4 frames (the longer
instances). Instances are priced by ``mllm_jax.data.encoder_balance.tower_cost`` on a ViT-L/14 (336 px: 577 tokens
an image, 4 x 256 a video chunk). Row-bound: a device encodes the instances of its own samples (the contiguous split
of the sample-major instance axis); balanced: ``mllm_jax.parallel.instance_balance.assign`` over all devices.
Reported per device count: busiest / mean encoder work (mean over ``--trials`` batches), and the static rows a device
encodes (row-bound: samples x 8 slots; balanced: the capacity bucket of the busiest device's count). Several processes
(``--devices_per_host`` each): the plan ``localize``d (instances left on their row-bound device where the counts
allow), its busiest / mean (the one-process plan's), the instances that move (all, and across hosts), and the rows
per device on the wire of its all_to_all ((devices - 1) x the per-pair bucket K) next to an all-gather of the
row-bound slices ((devices - 1) x samples x 8), the fallback of a gather XLA partitions itself.

Part 2 (CPU step time, configs/vlm_tiny_frozen.gin with the LLM trainable (``STAGE2``: frozen ViT; one device): the
train step (a) from pixels (the frozen encoder's forward in the step), (b) from cached features in the second epoch, the
cache lookup on the host included, (c) text only: the same token ids with no encoder inputs (placeholders embedded as
ordinary tokens), the same token count. Modes interleaved round by round (rotating their order);
cached_step_vs_text_only is the median over rounds of cached / text in the same round (robust to a shared host's
load drifting); the compiled programs' FLOPs are reported beside (noise-free).

Final JSON line (also written to --out): balanced_max_over_mean (worst over device counts; goal <= 1.05),
row_bound_max_over_mean (worst), per_devices, step_s, cached_step_vs_text_only (goal <= 1.1), ...
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._report import report  # noqa: E402
from mllm_jax.data.encoder_balance import capacity, tower_cost  # noqa: E402
from mllm_jax.parallel.instance_balance import assign, localize, lower_bound, pair_count  # noqa: E402

IMAGE_PROBS = (0.22, 0.28, 0.16, 0.1, 0.08, 0.06, 0.04, 0.03, 0.03)  # P(0..8 images in a sample)
VIDEO_P = 0.1
SLOTS = 8
VIT_L = dict(d_model=1024, d_ff=4096, n_layers=24)
IMAGE_TOKENS, CHUNK_TOKENS = 577, 4 * 256
# The recipe's LLM is frozen too (LLaVA stage 1): its text-only step then has nothing to differentiate and XLA drops
# the whole backward, while the multimodal step must backpropagate through the LLM to reach the projector. Part 2
# therefore trains the LLM (stage 2: frozen encoder, trainable projector and LLM), where both steps do the same LLM
# work; pass --gin_param to time other bindings (e.g. --gin_param='ModelConfig.trainable = {"encoders/vision": False,
# "llm": False}' for stage 1 as written).
STAGE2 = ['ModelConfig.trainable = {"encoders/vision": False}']


def sample_instances(rng, n_samples: int):
    """(cost of every instance, the sample it belongs to)."""
    costs, owner = [], []
    image_cost, chunk_cost = (tower_cost(t, **VIT_L) for t in (IMAGE_TOKENS, CHUNK_TOKENS))
    for s in range(n_samples):
        if rng.random() < VIDEO_P:
            k, c = int(rng.integers(1, 5)), chunk_cost
        else:
            k, c = int(rng.choice(len(IMAGE_PROBS), p=IMAGE_PROBS)), image_cost
        costs += [c] * k
        owner += [s] * k
    return np.asarray(costs), np.asarray(owner, np.int64)


def planner_part(device_counts, samples_per_device: int, trials: int, devices_per_host: int = 8) -> dict:
    out = {}
    for d in device_counts:
        rb, bal, bal_lb, rows_bal, secs = [], [], [], [], []
        multi, moved, cross, k_pair, secs_local = [], [], [], [], []
        for t in range(trials):
            rng = np.random.default_rng([d, t])
            costs, owner = sample_instances(rng, d * samples_per_device)
            loads_rb = np.bincount(owner // samples_per_device, weights=costs, minlength=d)
            t0 = time.perf_counter()
            plan = assign(costs, d)
            secs.append(time.perf_counter() - t0)
            rb.append(loads_rb.max() / loads_rb.mean())
            bal.append(plan.max_over_mean())
            bal_lb.append(plan.loads.max() / lower_bound(costs, d))
            rows_bal.append(capacity(int(plan.counts.max())))
            source = owner // samples_per_device  # the row-bound device of every instance
            t0 = time.perf_counter()
            local = localize(plan, costs, source)
            secs_local.append(time.perf_counter() - t0)
            multi.append(local.max_over_mean())
            move = local.device != source
            moved.append(float(move.mean()))
            cross.append(float((move & (source // devices_per_host != local.device // devices_per_host)).mean()))
            k = pair_count(local, source)
            k_pair.append(capacity(k) if k else 0)
        out[d] = {"row_bound_max_over_mean": float(np.mean(rb)), "balanced_max_over_mean": float(np.mean(bal)),
                  "balanced_over_lower_bound": float(np.mean(bal_lb)),
                  "rows_per_device_row_bound": samples_per_device * SLOTS,
                  "rows_per_device_balanced": float(np.mean(rows_bal)), "assign_ms": 1e3 * float(np.mean(secs)),
                  "multi_process_max_over_mean": float(np.mean(multi)), "moved_fraction": float(np.mean(moved)),
                  "moved_across_hosts_fraction": float(np.mean(cross)), "pair_capacity_max": int(max(k_pair)),
                  "all_to_all_rows_per_device": float(np.mean([(d - 1) * k for k in k_pair])),
                  "all_gather_rows_per_device": (d - 1) * samples_per_device * SLOTS,
                  "moved_rows_per_device": float(np.mean(moved)) * len(costs) / d,
                  "localize_ms": 1e3 * float(np.mean(secs_local))}
        print(f"{d:>4} devices: row-bound {out[d]['row_bound_max_over_mean']:.3f}  balanced "
              f"{out[d]['balanced_max_over_mean']:.4f} (vs lower bound {out[d]['balanced_over_lower_bound']:.4f})  "
              f"rows/device {samples_per_device * SLOTS} -> {out[d]['rows_per_device_balanced']:.1f}  "
              f"assign {out[d]['assign_ms']:.1f} ms", flush=True)
        print(f"      {devices_per_host} a host: busiest/mean {out[d]['multi_process_max_over_mean']:.4f}, moved "
              f"{out[d]['moved_fraction']:.2f} ({out[d]['moved_across_hosts_fraction']:.2f} across hosts), K "
              f"{out[d]['pair_capacity_max']}, rows/device moved {out[d]['moved_rows_per_device']:.1f}, all_to_all "
              f"{out[d]['all_to_all_rows_per_device']:.0f}, all-gather {out[d]['all_gather_rows_per_device']}, "
              f"localize {out[d]['localize_ms']:.1f} ms", flush=True)
    return out


def step_part(rounds: int, gin_params) -> dict:
    import gin
    import jax
    from flax import nnx

    from mllm_jax.data import SyntheticBatches, TextCodec
    from mllm_jax.data.encoder_cache import FrozenEncoders, open_cache
    from mllm_jax.data.placement import put_batch
    from mllm_jax.parallel.sharding import rule_table
    from mllm_jax.train import loop
    from mllm_jax.train.optimizer import make_optimizer
    from mllm_jax.train.step import make_train_step

    cfg = loop.load_run_config(["configs/vlm_tiny_frozen.gin"], list(gin_params))
    gin.clear_config()
    per_step = cfg.data.batch_size * cfg.data.samples_per_row
    cache_dir = tempfile.mkdtemp(prefix="encoder_cache_bench_")
    import dataclasses

    data_cfg = dataclasses.replace(cfg.data, epoch_samples=per_step * rounds, encoder_cache=cache_dir)
    cfg = dataclasses.replace(cfg, data=data_cfg)
    loop.validate(cfg, jax.device_count())
    mesh = loop.build_mesh(cfg.parallel)
    table = rule_table(cfg.model, cfg.parallel)
    stream = SyntheticBatches(cfg.model, data_cfg, codec=TextCodec())
    try:
        with jax.set_mesh(mesh):
            model = loop.create_model(cfg, mesh)
            enc = FrozenEncoders(model, mesh, cfg.parallel, ["vision"])
            cache = open_cache(cache_dir, cfg.model, data_cfg, enc)
            trainable = loop.trainable_filter(cfg.model)
            opt = loop.make_nnx_optimizer(model, make_optimizer(cfg.optimizer, 1000), trainable)
            gdef, state0 = nnx.split((model, opt))
            step = jax.jit(make_train_step(gdef, trainable))

            def run(state, host):
                t0 = time.perf_counter()
                state, m = step(state, put_batch(host, mesh, leading=1, rule_table=table))
                float(m["loss"])
                return state, time.perf_counter() - t0

            def text_only(host):
                return {k: v for k, v in host.items() if k not in ("encoder_inputs", "feature_index")}

            states = {k: jax.tree.map(lambda a: a.copy(), state0) for k in ("pixels", "cached", "text")}
            times = {k: [] for k in ("pixels", "cached", "text", "fill_lookup", "cached_lookup")}
            ratios = []  # cached / text within one round (seconds apart): robust to the host's load drifting
            # The compiled programs' FLOPs (XLA's cost analysis): the noise-free part of the comparison.
            host0 = stream.batch_at(0)
            flops = {}
            for mode, b in (("pixels", host0), ("cached", cache.features(host0, stream.instance_keys(0), enc)),
                            ("text", text_only(host0))):
                cost = step.lower(state0, put_batch(b, mesh, leading=1, rule_table=table)).compile().cost_analysis()
                flops[mode] = float((cost[0] if isinstance(cost, list) else cost)["flops"])
            # Epoch 1 fills the cache (and warms up every program); epoch 2 is timed.
            for epoch in range(2):
                for r in range(rounds):
                    host = stream.batch_at(epoch * rounds + r)
                    t0 = time.perf_counter()
                    feats = cache.features(host, stream.instance_keys(epoch * rounds + r), enc)
                    lookup = time.perf_counter() - t0
                    inputs = {"pixels": host, "cached": feats, "text": text_only(host)}
                    took = {}
                    for mode in np.roll(["pixels", "cached", "text"], r):  # each mode in each slot of the round
                        states[mode], took[mode] = run(states[mode], inputs[mode])
                    t_pix, t_cached, t_text = took["pixels"], took["cached"], took["text"]
                    if epoch == 1 and r > 0:  # r == 0 of epoch 2: the first step after the fill compiles nothing
                        ratios.append((t_cached + lookup) / t_text)
                        times["pixels"].append(t_pix)
                        times["cached"].append(t_cached + lookup)
                        times["text"].append(t_text)
                        times["cached_lookup"].append(lookup)
                    elif epoch == 0:
                        times["fill_lookup"].append(lookup)
        med = {k: float(np.median(v)) for k, v in times.items()}
        fastest = {k: float(np.min(v)) for k, v in times.items()}  # less sensitive to other jobs on a shared host
        print(f"step (s, median): pixels {med['pixels']:.3f}  cached {med['cached']:.3f} (lookup "
              f"{med['cached_lookup']:.3f})  text only {med['text']:.3f}; epoch-1 fill {med['fill_lookup']:.3f}; "
              f"cache hits {cache.counts['hits']}, misses {cache.counts['misses']}", flush=True)
        print(f"step FLOPs: pixels {flops['pixels']:.4g}  cached {flops['cached']:.4g}  text {flops['text']:.4g}; "
              f"cached / text per round: {np.round(ratios, 3).tolist()}", flush=True)
        return {"step_s": med, "step_s_min": fastest, "step_s_all": times, "cache_counts": dict(cache.counts),
                "step_flops": flops, "cached_step_flops_vs_text_only": flops["cached"] / flops["text"],
                "pixels_step_flops_vs_text_only": flops["pixels"] / flops["text"],
                "cached_vs_text_per_round": ratios,
                "cached_step_vs_text_only": float(np.median(ratios)),
                "cached_step_vs_text_only_of_medians": med["cached"] / med["text"],
                "cached_step_vs_text_only_min": fastest["cached"] / fastest["text"],
                "pixels_step_vs_text_only": med["pixels"] / med["text"],
                "cached_step_vs_pixels": med["cached"] / med["pixels"]}
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="")
    ap.add_argument("--devices", default="8,16,32,64,128,256")
    ap.add_argument("--samples_per_device", type=int, default=8)
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--devices_per_host", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=6, help="timed steps per mode (part 2) + 1")
    ap.add_argument("--gin_param", action="append", default=None,
                    help="bindings for the part-2 recipe (default: LLaVA stage 2, the LLM trainable: see STAGE2)")
    ap.add_argument("--skip_steps", action="store_true", help="part 1 only")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 8 and 16 devices, 2 trials, 3 timed steps")
    args = ap.parse_args(argv)
    if args.quick:
        args.devices, args.trials, args.rounds = "8,16", min(args.trials, 2), min(args.rounds, 3)
    devices = [int(d) for d in args.devices.split(",")]
    t0 = time.perf_counter()
    per = planner_part(devices, args.samples_per_device, args.trials, args.devices_per_host)
    result = {
        "benchmark": "encoder_balance", "quick": args.quick, "devices": devices,
        "samples_per_device": args.samples_per_device, "trials": args.trials,
        "per_devices": {str(d): v for d, v in per.items()},
        "balanced_max_over_mean": max(v["balanced_max_over_mean"] for v in per.values()),
        "row_bound_max_over_mean": max(v["row_bound_max_over_mean"] for v in per.values()),
        "multi_process_max_over_mean": max(v["multi_process_max_over_mean"] for v in per.values()),
        "goal_balanced_max_over_mean": 1.05, "goal_cached_step_vs_text_only": 1.1,
    }
    if not args.skip_steps:
        params = STAGE2 if args.gin_param is None else args.gin_param
        result["step_gin_params"] = params
        result.update(step_part(args.rounds, params))
    result["wall_s"] = time.perf_counter() - t0
    result["meets_goals"] = bool(result["balanced_max_over_mean"] <= 1.05
                                 and result.get("cached_step_vs_text_only", 0.0) <= 1.1)
    report(result, args.out)
    return result


if __name__ == "__main__":
    main()
