"""Train a multimodal LLM from a gin recipe.

  python train.py --gin_file=configs/vlm_tiny.gin --workdir=runs/vlm_tiny
  python train.py --gin_file=configs/llava_7b.gin --workdir=/tmp/llava --dry_run
  python train.py --gin_file=configs/vlm_tiny.gin --gin_param=ParallelConfig.data=8 --cpu_devices=8 --workdir=...

Rerunning the same command resumes from the newest checkpoint in --workdir.
"""

from __future__ import annotations

import os
import re
import sys

from absl import app, flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_multi_string("gin_file", [], "gin recipe(s), applied in order")
flags.DEFINE_multi_string("gin_param", [], "gin binding(s) applied after the files, e.g. TrainConfig.steps=100")
flags.DEFINE_string("workdir", None, "checkpoints, metrics.jsonl, TensorBoard events and the resolved config")
flags.DEFINE_integer("cpu_devices", 1, "on CPU: the number of (fake) devices, set before jax starts")
flags.DEFINE_bool("dry_run", False, "build abstractly: print the mesh, parameter counts and a memory estimate")


def set_cpu_device_count(n: int) -> None:
    """Must run before jax initialises its backends: XLA reads the device count once."""
    if n < 1:
        raise ValueError(f"--cpu_devices must be >= 1; got {n}")
    xla_flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
    os.environ["XLA_FLAGS"] = f"{xla_flags} --xla_force_host_platform_device_count={n}".strip()
    if "jax" in sys.modules:
        import jax

        jax.config.update("jax_num_cpu_devices", n)


def main(argv) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    set_cpu_device_count(FLAGS.cpu_devices)
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    # Imported only now so the device count above is in force when jax starts.
    from mllm_jax import gin_setup
    from mllm_jax.train import loop

    cfg = loop.load_run_config(FLAGS.gin_file, FLAGS.gin_param)
    if FLAGS.dry_run:
        from mllm_jax.train import dry_run

        dry_run.report(cfg)
        return 0
    if not FLAGS.workdir:
        raise app.UsageError("--workdir is required (unless --dry_run)")
    try:
        summary = loop.run(cfg, FLAGS.workdir, config_text=gin_setup.config_str())
    except loop.NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"done: {summary}")
    return 0


if __name__ == "__main__":
    app.run(main)
