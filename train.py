"""Train a multimodal LLM from a gin recipe.

  python train.py --gin_file=configs/vlm_tiny.gin --workdir=runs/vlm_tiny
  python train.py --gin_file=configs/llava_7b.gin --workdir=/tmp/llava --dry_run
  python train.py --gin_file=configs/vlm_tiny.gin --gin_param=ParallelConfig.data=8 --cpu_devices=8 --workdir=...
  python train.py --gin_file=configs/llava_7b.gin --compile_only --target=tpu:v5p:4x4x4   # docs/compile.md

Multi-host (one process per host; under SLURM, Open MPI or on a Cloud TPU VM the three flags are detected):

  python train.py ... --coordinator_address=10.0.0.1:1234 --num_processes=2 --process_id=0   # and =1 on host 2

Rerunning the same command resumes from the newest checkpoint in --workdir.
"""

from __future__ import annotations

import contextlib
import sys

from absl import app, flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_multi_string("gin_file", [], "gin recipe(s), applied in order")
flags.DEFINE_multi_string("gin_param", [], "gin binding(s) applied after the files, e.g. TrainConfig.steps=100")
flags.DEFINE_string("workdir", None, "checkpoints, metrics.jsonl, TensorBoard events and the resolved config")
flags.DEFINE_integer("cpu_devices", None, "on CPU: the number of (fake) devices of this process, set before jax "
                     "starts; the process then runs on the CPU backend (JAX_PLATFORMS=cpu unless set). Unset: left "
                     "as XLA_FLAGS has it, 1 by default")
flags.DEFINE_bool("dry_run", False, "build abstractly: print the mesh, parameter counts, a memory estimate and, "
                  "with ParallelConfig.pipeline > 1, the pipeline plan and its microbatch count (on analytic "
                  "per-layer costs; with --target on costs compiled for the target's chip)")
flags.DEFINE_bool("compile_only", False, "compile the train step for --target with the target's own compiler (no "
                  "accelerator needed: libtpu / jax-cuda12-plugin) and report memory per chip, FLOPs, collectives, "
                  "Pallas calls, the roofline step time and mfu_bound; the last line is JSON. Exit 1 when it does "
                  "not compile or fit")
flags.DEFINE_bool("compile_costs", True, "with --compile_only: also compile an unrolled copy of the step for exact "
                  "FLOP and byte figures (the roofline and mfu_bound). A 7B model's copy needs more host memory than "
                  "the step itself (over 24 GiB for LLaVA-7B on 8 chips); --nocompile_costs reports memory, "
                  "collectives and kernels without it")
flags.DEFINE_string("target", None, "with --compile_only (or --dry_run: plan the pipeline on per-layer costs "
                    "compiled for a TPU target or cpu; for a GPU target on the analytic costs priced on its chip): "
                    "tpu:<chip>:<topology> (tpu:v5p:4x4x4, tpu:v5e:16x16), a Cloud TPU name (tpu:v5p-128, "
                    "tpu:v5litepod-256) or gpu:<chip>:<hosts>x<gpus> (gpu:h100:2x8)")
flags.DEFINE_string("coordinator_address", None, "multi-host: HOST:PORT of process 0's coordinator")
flags.DEFINE_integer("num_processes", None, "multi-host: the number of processes in the job")
flags.DEFINE_integer("process_id", None, "multi-host: this process's index in [0, num_processes)")
flags.DEFINE_integer("distributed_timeout_s", 300, "multi-host: seconds to wait for the coordinator and the other "
                     "processes before failing with a message naming the address and this process")
flags.DEFINE_bool("traceback", False, "on a refused input (config, recipe, dataset, workdir, checkpoint) print the "
                  "whole traceback instead of the one-line error")

def main(argv) -> int:
    from mllm_jax.cli import one_line_errors  # (jax starts later: the backends read XLA_FLAGS when first used)

    return one_line_errors(lambda: _main(argv), traceback=FLAGS.traceback)


def _main(argv) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.target and not (FLAGS.compile_only or FLAGS.dry_run):
        raise app.UsageError("--target goes with --compile_only (e.g. --compile_only --target=tpu:v5e:2x2) or "
                             "--dry_run (the pipeline plan on per-layer costs compiled for the target)")
    if FLAGS.compile_only:
        if not FLAGS.target:
            raise app.UsageError("--compile_only needs --target (e.g. --compile_only --target=tpu:v5e:2x2)")
        return _compile_only()
    plan_target = None
    if FLAGS.target:  # --dry_run --target: the target's compiler runs on the host (as for --compile_only)
        from mllm_jax.train import targets

        _host_backend_only()
        plan_target = "cpu" if FLAGS.target == "cpu" else targets.parse(FLAGS.target)
    # Before anything touches jax: XLA:CPU flags, the CPU device count and (when several processes) the distributed
    # runtime.
    from mllm_jax import cpu_flags, distributed

    cpu_flags.apply()
    distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                           cpu_devices=FLAGS.cpu_devices, timeout_s=FLAGS.distributed_timeout_s)
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    from mllm_jax import gin_setup
    from mllm_jax.train import loop

    if not FLAGS.workdir and not FLAGS.dry_run:
        raise app.UsageError("--workdir is required (unless --dry_run)")
    with _cpu_device_hint():
        cfg = loop.load_run_config(FLAGS.gin_file, FLAGS.gin_param)
        if FLAGS.dry_run:
            from mllm_jax.train import dry_run

            dry_run.report(cfg, target=plan_target)
            return 0
        summary = loop.run(cfg, FLAGS.workdir, config_text=gin_setup.config_str())  # NonFiniteLossError: a RuntimeError
    print(f"done: {summary}")
    return 0


@contextlib.contextmanager
def _cpu_device_hint():
    """A layout that does not fit this process's CPU devices (a --dry_run of a pod layout on a laptop) says how to
    get more."""
    import jax

    from mllm_jax.parallel.config import DeviceCountError

    try:
        yield
    except DeviceCountError as e:
        if FLAGS.cpu_devices or jax.default_backend() != "cpu":
            raise
        raise DeviceCountError(f"{e} (this process has {jax.device_count()} CPU device(s); --cpu_devices=N gives it "
                               f"N, e.g. to --dry_run a multi-device layout)") from e


def _host_backend_only() -> None:
    """A target's compiler runs on the host: jax's own backend is the CPU, which only builds abstract arrays (the
    target's compiler comes from libtpu / the CUDA plugin)."""
    from mllm_jax.distributed import use_cpu_backend

    use_cpu_backend()


def _compile_only() -> int:
    _host_backend_only()
    logging.set_verbosity(logging.WARNING)
    from mllm_jax.train import compile_target, loop, targets

    try:
        target = targets.parse(FLAGS.target)
    except targets.UnknownTargetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cfg = loop.load_run_config(FLAGS.gin_file, FLAGS.gin_param)
    return compile_target.main(cfg, target, costs=FLAGS.compile_costs)


if __name__ == "__main__":
    app.run(main)
