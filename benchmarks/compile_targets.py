"""Recipe x target x layout -> compiled by the target's own compiler: fits, GiB per chip, roofline step time,
mfu_bound, collectives, Pallas calls, compile time (mllm_jax.train.compile_target; docs/compile.md).

  python benchmarks/compile_targets.py --out /tmp/compile_targets.json
  python benchmarks/compile_targets.py --recipes vlm_tiny --targets tpu:v5e:2x2 gpu:h100:1x1 \
      --layouts "data=4" "data=4 attention=xla" "1" --out /tmp/ct.json

A layout is space-separated ParallelConfig fields (``data=2 tensor=2 microbatches=2``), "1" for all ones, plus the
shorthands ``attention=<impl>`` (ModelConfig.attention_impl) and ``loop=<scan|unrolled>`` (ModelConfig.layer_loop).
Layouts whose device count is not the target's are skipped. Each case runs in its own process (libtpu and the gin
state stay per case; a compiler crash loses one case). Prints one JSON line per case, then the summary JSON line.
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


def run_case(recipe: str, target: str, layout: str, timeout: int) -> dict:
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), f"--gin_file={os.path.join(ROOT, 'configs', recipe)}.gin",
           "--compile_only", f"--target={target}"] + [f"--gin_param={g}" for g in gin_params(layout)]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                           env={**os.environ, "JAX_PLATFORMS": "cpu"})
    except subprocess.TimeoutExpired:
        return {"recipe": recipe, "target": target, "layout": layout, "compiled": False, "fits": False,
                "error": f"timed out after {timeout} s"}
    lines = [l for l in p.stdout.splitlines() if l.startswith("{")]
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
    args = ap.parse_args(argv)
    if args.recipes or args.targets or args.layouts:
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
        r = run_case(recipe, target, layout, args.timeout)
        keep = ("recipe", "target", "layout", "compiled", "fits", "per_device_gib", "hbm_gib", "roofline_step_s",
                "mfu_bound", "pallas_calls", "collectives", "compile_s", "error")
        row = {k: r.get(k) for k in keep if k in r}
        if row.get("error"):
            row["error"] = str(row["error"])[:400]
        print(json.dumps(row), flush=True)
        results.append(row)
    summary = {"benchmark": "compile_targets", "cases": results,
               "compiled": sum(bool(r.get("compiled")) for r in results),
               "fits": sum(bool(r.get("fits")) for r in results), "total": len(results)}
    report(summary, args.out)
    return summary


if __name__ == "__main__":
    main()
