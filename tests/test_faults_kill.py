"""train.py killed as a user's machine would kill it (issue 17), in subprocesses with one CPU device:

- kill -9 at random moments of a run that saves (asynchronously) every step, again and again: each rerun takes over
  the dead run's stale lock, resumes from the newest intact checkpoint, and the final metrics hold one row per step
  with exactly the losses of an uninterrupted run;
- Ctrl-C (SIGINT) saves a checkpoint at the step it stopped and exits cleanly, like SIGTERM.
"""

import os
import random
import signal
import subprocess
import sys
import time

import pytest

from mllm_jax.train.metrics import read_metrics
from train_main import TINY as BASE_TINY
from subprocess_env import check_signal_saves_last_step, child_env, metrics_rows

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = BASE_TINY + ["TrainConfig.checkpoint_every = 1", "CheckpointConfig.keep = 2",
                    "CheckpointConfig.async_save = True", "ParallelConfig.data = 1"]


def _cmd(workdir, *params):
    return ([sys.executable, os.path.join(ROOT, "train.py"), "--gin_file=configs/vlm_tiny.gin", f"--workdir={workdir}",
             "--cpu_devices=1"] + [f"--gin_param={p}" for p in TINY + list(params)])


def _losses(workdir):
    return {r["step"]: r["loss"] for r in read_metrics(workdir)}


@pytest.mark.slow
def test_kill_9_at_random_points_of_saves_resumes_to_the_uninterrupted_losses(tmp_path):
    steps = 8
    ref = str(tmp_path / "ref")
    out = subprocess.run(_cmd(ref, f"TrainConfig.steps={steps}"), cwd=ROOT, env=child_env(), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    workdir = str(tmp_path / "killed")
    rng = random.Random(17)
    kills = 0
    for attempt in range(8):
        proc = subprocess.Popen(_cmd(workdir, f"TrainConfig.steps={steps}"), cwd=ROOT, env=child_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if kills < 4:
            before = max([r["step"] for r in metrics_rows(workdir)], default=0)
            deadline = time.time() + 200
            while time.time() < deadline and proc.poll() is None:  # a step ran (and its save began)
                if max([r["step"] for r in metrics_rows(workdir)], default=0) > before:
                    break
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 0.4))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                kills += 1
                continue
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-3000:]
        if f"'end_step': {steps}" in stdout:
            break
    assert kills >= 2, "the run finished before it could be killed: kill earlier"
    rows = read_metrics(workdir)
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    assert _losses(workdir) == _losses(ref)  # bitwise: same floats at every step
    assert not os.path.exists(os.path.join(workdir, "lock"))


@pytest.mark.slow
def test_sigint_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    workdir = str(tmp_path)
    check_signal_saves_last_step(_cmd(workdir, "TrainConfig.steps=100000", "TrainConfig.checkpoint_every=1000"),
                                 workdir, signal.SIGINT, cwd=ROOT, wait_s=300)
