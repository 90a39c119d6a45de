"""Recipe x target x layout -> compiled by the target's own compiler: fits, GiB per chip, roofline step time,
mfu_bound, collectives, Pallas calls, compile time (mllm_jax.train.compile_target; docs/compile.md).

  python benchmarks/compile_targets.py --out /tmp/compile_targets.json
  python benchmarks/compile_targets.py --recipes vlm_tiny --targets tpu:v5e:2x2 gpu:h100:1x1 \
      --layouts "data=4" "data=4 attention=xla" "1" --out /tmp/ct.json

A layout is space-separated ParallelConfig fields (``data=2 tensor=2 microbatches=2``), "1" for all ones, plus the
shorthands ``attention=<impl>`` (ModelConfig.attention_impl) and ``loop=<scan|unrolled>`` (ModelConfig.layer_loop).
Layouts whose device count is not the target's are skipped. Each case runs in its own process (libtpu and the gin
state stay per case; a compiler crash loses one case). Prints one JSON line per case, then the summary JSON line.

``--no_costs`` skips the second (unrolled) compile that gives the FLOPs, bytes, roofline and mfu_bound: memory, fits,
collectives and Pallas calls only (compile_target.compile_for_target(costs=False); a 7B case in ~1/4 of the time).
``--cases FILE`` reads "recipe | target | layout" lines (blank and # lines skipped) instead of a cross product; a
layout may carry gin bindings as is (``fsdp=8 ModelConfig.remat="dots"``), and ``--append`` adds each case's line to
the --out file as it finishes (a sweep that is stopped keeps what it finished).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks._report import report  # noqa: E402

PARALLEL_FIELDS = ("data", "fsdp", "pipeline", "context", "tensor", "microbatches")
DEFAULT_CASES = [  # (recipe, target, layout)
    ("vlm_tiny", "tpu:v5e:1x1", "1"),
    ("vlm_tiny", "tpu:v5e:2x2", "data=4"),
    ("vlm_tiny", "tpu:v5e:2x2", "fsdp=4"),
    ("vlm_tiny", "tpu:v5e:2x2", "data=2 tensor=2"),
    ("vlm_tiny", "tpu:v5e:2x2", "context=4"),
    ("vlm_tiny", "tpu:v5e:2x2", "pipeline=4 microbatches=4"),
    ("vlm_tiny", "tpu:v5e:2x2", "data=4 attention=xla"),
    ("vlm_tiny", "tpu:v5e:2x2", "data=2 tensor=2 attention=xla"),
    ("vlm_tiny", "gpu:h100:1x1", "1"),
    ("vlm_tiny", "gpu:h100:1x2", "data=2"),
    ("vlm_tiny", "gpu:h100:1x2", "data=2 attention=xla"),
]


def gin_params(layout: str) -> list[str]:
    params = []
    for item in layout.split():
        if item == "1":
            continue
        key, _, value = item.partition("=")
        if key in PARALLEL_FIELDS:
            params.append(f"ParallelConfig.{key}={int(value)}")
        elif key == "attention":
            params.append(f'ModelConfig.attention_impl="{value}"')
        elif key == "loop":
            params.append(f'ModelConfig.layer_loop="{value}"')
        else:
            params.append(item)  # a gin binding as is
    return params


def layout_devices(layout: str) -> int:
    sizes = {k: 1 for k in PARALLEL_FIELDS if k != "microbatches"}
    for item in layout.split():
        key, _, value = item.partition("=")
        if key in sizes:
            sizes[key] = int(value)
    return math.prod(sizes.values())


def _one_case(recipe: str, target: str, layout: str, costs: bool) -> int:
    """The child process of a case: train.py --compile_only's path, with the costs switch."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from mllm_jax.train import compile_target, loop, targets

    cfg = loop.load_run_config([os.path.join(ROOT, "configs", recipe) + ".gin"], gin_params(layout))
    return compile_target.main(cfg, targets.parse(target), costs=costs)


def run_case(recipe: str, target: str, layout: str, timeout: int, costs: bool = True, log: str | None = None) -> dict:
    if costs:
        cmd = [sys.executable, os.path.join(ROOT, "train.py"),
               f"--gin_file={os.path.join(ROOT, 'configs', recipe)}.gin", "--compile_only", f"--target={target}"]
        cmd += [f"--gin_param={g}" for g in gin_params(layout)]
    else:
        cmd = [sys.executable, os.path.abspath(__file__), "--_one", recipe, target, layout]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                           env={**os.environ, "JAX_PLATFORMS": "cpu"})
    except subprocess.TimeoutExpired:
        return {"recipe": recipe, "target": target, "layout": layout, "compiled": False, "fits": False,
                "error": f"timed out after {timeout} s"}
    if log:  # the whole report (memory breakdown, cost basis) and the compiler's error
        with open(log, "w") as f:
            f.write(f"$ {' '.join(cmd)}\n{p.stdout}\n--- stderr ---\n{p.stderr[-20000:]}")
    lines = [line for line in p.stdout.splitlines() if line.startswith("{")]
    out = json.loads(lines[-1]) if lines else {"fits": False, "error": p.stderr.strip().splitlines()[-1:]}
    out.update(recipe=recipe, target=target, layout=layout, wall_s=time.perf_counter() - t0,
               compiled="error" not in out or out.get("per_device_gib") is not None)
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipes", nargs="*", help="recipe names (configs/<name>.gin); with --targets and --layouts "
                    "the cross product replaces the default cases")
    ap.add_argument("--targets", nargs="*")
    ap.add_argument("--layouts", nargs="*")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per case")
    ap.add_argument("--out", default=None)
    ap.add_argument("--no_costs", action="store_true", help="skip the cost compile: no FLOPs, roofline, mfu_bound")
    ap.add_argument("--cases", default=None, help="a file of 'recipe | target | layout' lines")
    ap.add_argument("--append", action="store_true", help="append each case's JSON line to --out as it finishes")
    ap.add_argument("--logs", default=None, help="a folder for each case's whole output (<n>.log)")
    ap.add_argument("--_one", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._one:
        sys.exit(_one_case(*args._one, costs=False))
    if args.cases:
        with open(args.cases) as f:
            cases = [tuple(x.strip() for x in line.split("|")) for line in f
                     if line.strip() and not line.lstrip().startswith("#")]
    elif args.recipes or args.targets or args.layouts:
        if not (args.recipes and args.targets and args.layouts):
            ap.error("--recipes, --targets and --layouts go together")
        cases = [(r, t, l) for r in args.recipes for t in args.targets for l in args.layouts]
    else:
        cases = DEFAULT_CASES
    from mllm_jax.train import targets as targets_lib

    results = []
    for recipe, target, layout in cases:
        n = targets_lib.parse(target).num_devices
        if layout_devices(layout) != n:
            continue
        log = None
        if args.logs:
            os.makedirs(args.logs, exist_ok=True)
            log = os.path.join(args.logs, f"{len(results):03d}_{recipe}_{target.replace(':', '-')}.log")
        r = run_case(recipe, target, layout, args.timeout, costs=not args.no_costs, log=log)
        keep = ("recipe", "target", "layout", "compiled", "fits", "per_device_gib", "hbm_gib", "flops_per_device",
                "model_flops", "roofline_step_s", "mfu_bound", "pallas_calls", "collectives", "compile_s",
                "cost_compile_s", "wall_s", "error")
        row = {k: r.get(k) for k in keep if k in r}
        if row.get("error"):
            row["error"] = str(row["error"])[:400]
        print(json.dumps(row), flush=True)
        if args.append and args.out:
            with open(args.out + ".cases", "a") as f:
                f.write(json.dumps(row) + "\n")
        results.append(row)
    summary = {"benchmark": "compile_targets", "cases": results,
               "compiled": sum(bool(r.get("compiled")) for r in results),
               "fits": sum(bool(r.get("fits")) for r in results), "total": len(results)}
    report(summary, args.out)
    return summary


if __name__ == "__main__":
    main()
