"""train.py as a user runs it (subprocesses, --cpu_devices): a run continued across device counts 1 -> 8 -> 1
reproduces the uninterrupted one-device run, and SIGTERM leaves a checkpoint and exits cleanly."""

import os
import signal
import subprocess
import sys

import pytest

from mllm_jax.train.metrics import read_metrics
from train_main import TINY as BASE_TINY
from subprocess_env import check_signal_saves_last_step, child_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = BASE_TINY + ["TrainConfig.checkpoint_every = 100", "TrainConfig.steps = 6"]


def _cmd(workdir, devices, *params):
    args = [sys.executable, os.path.join(ROOT, "train.py"), "--gin_file=configs/vlm_tiny.gin",
            f"--workdir={workdir}", f"--cpu_devices={devices}"]
    return args + [f"--gin_param={p}" for p in TINY + [f"ParallelConfig.data={devices}", *params]]


def _train(workdir, devices, *params):
    out = subprocess.run(_cmd(workdir, devices, *params), cwd=ROOT, env=child_env(), capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@pytest.mark.slow
def test_continuing_across_device_counts_reproduces_one_device(tmp_path):
    ref, moved = str(tmp_path / "ref"), str(tmp_path / "moved")
    _train(ref, 1)
    _train(moved, 1, "TrainConfig.stop_at_step=2")
    assert "resumed from step 2" in _train(moved, 8, "TrainConfig.stop_at_step=4")  # 1 device -> 8
    assert "resumed from step 4" in _train(moved, 1)  # 8 devices -> 1
    want = {r["step"]: r["loss"] for r in read_metrics(ref)}
    got = {r["step"]: r["loss"] for r in read_metrics(moved)}
    assert sorted(got) == sorted(want) == [1, 2, 3, 4, 5, 6]
    for step in want:  # 8-way data parallelism only reorders float sums
        assert got[step] == pytest.approx(want[step], rel=1e-5, abs=1e-6), step


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    workdir = str(tmp_path)
    check_signal_saves_last_step(_cmd(workdir, 1, "TrainConfig.steps=100000"), workdir, signal.SIGTERM, cwd=ROOT)


@pytest.mark.parametrize("params,names", [
    (["--gin_file=configs/no_such_recipe.gin"], ["FileNotFoundError", "no_such_recipe.gin"]),
    (["--gin_file=configs/vlm_tiny.gin", "--gin_param=ParallelConfig.data=3"], ["DeviceCountError", "data=3"]),
    (["--gin_file=configs/vlm_tiny.gin", "--cpu_devices=2", "--gin_param=ParallelConfig.pipeline=2",
      "--gin_param=ParallelConfig.microbatches=3", "--gin_param=DataConfig.batch_size=12",
      "--gin_param=ParallelConfig.pipeline_schedule='interleaved'"], ["ValueError", "microbatches=3"]),
])
def test_refused_input_is_one_line_naming_the_value(tmp_path, params, names):
    """A refused input ends with exit status 1 and one 'error:' line that names what is wrong, no traceback;
    --traceback brings the traceback back."""
    base = [sys.executable, os.path.join(ROOT, "train.py"), f"--workdir={tmp_path}"] + params
    out = subprocess.run(base, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 1, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    last = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(last) == 1 and all(n in last[0] for n in names), out.stderr[-2000:]
    loud = subprocess.run(base + ["--traceback"], cwd=ROOT, env=child_env(), capture_output=True, text=True,
                          timeout=300)
    assert loud.returncode != 0 and "Traceback" in loud.stderr
