"""MoE dispatch on CPU and the full-size MoE recipe on a TPU target, in one run (issue 22 item 6).

1. CPU: tokens/s of one MoE MLP's forward + backward (jit, median of --repeats) with the sorted grouped-matmul
   dispatch (``tiled``: row tiles of one expert each; ``ragged_dot``: jax.lax.ragged_dot) against the dense one-hot
   oracle (every expert on every token), side by side on the same weights and tokens; the outputs are checked equal.
   Note: on CPU jax.lax.ragged_dot lowers to a masked dense product over every group (G x the FLOPs), which is why
   ``moe_impl="auto"`` picks ``tiled`` on CPU and ragged_dot on TPU / GPU.
2. Target (``--target``, default tpu:v5p:2x2x4): configs/qwen3vl_30b_a3b.gin's train step compiled by the target's
   own compiler (compile_target.compile_for_target) with ``--layers`` decoder layers (default 4 of 48: compile
   time; the JSON says so): per-device FLOPs and bytes (cost analysis of an unrolled copy), HBM fit, and the
   all-to-all ops of the program (static count, bytes per device per op) with the analytic per-layer volume of the
   expert exchange. ``--layers 0`` skips it.

  python benchmarks/moe.py --out /tmp/moe.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks._report import report  # noqa: E402


def cpu_dispatch(tokens: int, d_model: int, d_ff: int, experts: int, top_k: int, repeats: int) -> dict:
    import dataclasses

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from mllm_jax import moe
    from mllm_jax.config import LLMConfig, RunSettings
    from mllm_jax.llm import LLM, use_layer_params

    cfg = LLMConfig(vocab_size=64, d_model=d_model, n_layers=1, n_heads=4, n_kv_heads=4, d_ff=d_ff,
                    n_experts=experts, experts_per_token=top_k)
    values, names = LLM(cfg, rngs=nnx.Rngs(0)).layer_params()
    p = jax.tree.map(lambda a: a[0], use_layer_params(values, names, RunSettings()))["moe"]
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, tokens, d_model)).astype(np.float32))
    out = {}
    ref = None
    for impl in ("tiled", "ragged_dot", "dense"):
        c = dataclasses.replace(cfg, moe_impl=impl)
        f = jax.jit(jax.value_and_grad(lambda p, x, c=c: jnp.sum(moe.moe_mlp(p, x, c)[0] ** 2), argnums=(0, 1)))
        v, g = f(p, x)
        jax.block_until_ready(g)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(f(p, x))
            times.append(time.perf_counter() - t0)
        if ref is None:
            ref = float(v)
        np.testing.assert_allclose(float(v), ref, rtol=1e-4)  # the same computation
        s = statistics.median(times)
        out[impl] = {"step_s": s, "tokens_per_s": tokens / s}
    out["tiled_over_dense"] = out["tiled"]["tokens_per_s"] / out["dense"]["tokens_per_s"]
    out["ragged_dot_over_dense"] = out["ragged_dot"]["tokens_per_s"] / out["dense"]["tokens_per_s"]
    out["shape"] = {"tokens": tokens, "d_model": d_model, "expert_d_ff": d_ff, "experts": experts, "top_k": top_k,
                    "what": "forward + backward of one MoE MLP, float32, jit, median of repeats"}
    return out


def target_compile(target_text: str, layers: int) -> dict:
    from mllm_jax.train import compile_target, loop, targets

    recipe = os.path.join(ROOT, "configs", "qwen3vl_30b_a3b.gin")
    cfg = loop.load_run_config([recipe], [f"LLMConfig.n_layers = {layers}"])
    target = targets.parse(target_text)
    r = compile_target.compile_for_target(cfg, target, costs=True)
    cfg = loop.for_devices(cfg, target.num_devices, chip=target.chip)
    llm, pc = cfg.model.llm, cfg.parallel
    # Expert exchange per MoE layer and microbatch, per device: the dropless buffer (every local assignment may go
    # to one device) is ep x (local tokens x k) rows of d_model, sent once forward and once back (bf16), and the
    # backward's two transposed exchanges.
    rows_local = cfg.data.batch_size // (pc.data * pc.fsdp * pc.expert * pc.microbatches) * cfg.data.seq_len
    a = rows_local * llm.experts_per_token
    exchange_bytes = pc.expert * a * llm.d_model * 2 if pc.expert > 1 else 0
    a2a = r["collectives"].get("all-to-all", {})
    return {
        "target": r["target"], "layout": r["layout"], "mesh": r["mesh"], "fits": r["fits"],
        "per_device_gib": r["per_device_gib"], "flops_per_device": r["flops_per_device"],
        "bytes_per_device": r["bytes_per_device"], "cost_basis": r["cost_basis"],
        "model_flops": r["model_flops"], "mfu_bound": r["mfu_bound"], "roofline_step_s": r["roofline_step_s"],
        "all_to_all_ops_static": a2a.get("count"), "all_to_all_bytes_per_device_static": a2a.get("bytes"),
        "expert_exchange_bytes_per_layer_per_microbatch_analytic": 4 * exchange_bytes,
        "collectives": r["collectives"], "compile_s": r["compile_s"], "cost_compile_s": r["cost_compile_s"],
        "layers": layers, "layers_full": 48,
        "note": (f"compiled with {layers} of the recipe's 48 decoder layers (compile time on a 2-core VM); per-layer "
                 "figures scale with the layer count. Static collective counts count an op inside a loop body once"),
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--d_model", type=int, default=256)
    ap.add_argument("--d_ff", type=int, default=256)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--top_k", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--target", default="tpu:v5p:2x2x4")
    ap.add_argument("--layers", type=int, default=4, help="decoder layers of the target compile (0: skip it)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run: 1024 tokens, 2 repeats, a 1-layer target compile")
    args = ap.parse_args(argv)
    if args.quick:
        args.tokens, args.repeats, args.layers = min(args.tokens, 1024), min(args.repeats, 2), min(args.layers, 1)
    result = {"benchmark": "moe", "machine": "cpu", "quick": args.quick,
              "cpu": cpu_dispatch(args.tokens, args.d_model, args.d_ff, args.experts, args.top_k, args.repeats)}
    if args.layers:
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        result["target"] = target_compile(args.target, args.layers)
    report(result, args.out)
    return result


if __name__ == "__main__":
    main()
