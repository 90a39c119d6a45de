"""Faults around a training run (issue 17), in-process on the 8 fake devices with the tiny model:

- a step whose update makes the parameters non-finite stops the run naming the step, and every checkpoint on disk
  (the newest included) is finite, also when rotation keeps only 2;
- a newest checkpoint that is truncated, has flipped bytes, corrupt metadata or is an empty directory is reported
  (step, file), moved aside to checkpoints/<step>.corrupt, and the run resumes from the older intact one with the
  uninterrupted run's losses;
- a workdir held by a live run is refused (the lock names host and pid), a stale lock is taken over, and a refused
  run writes nothing there (config.gin, run_config.json, tokenizer.json untouched);
- metrics.jsonl has one row per step after a resume that re-runs steps;
- the first SIGINT asks for a checkpoint like SIGTERM, the second aborts.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import gin
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from mllm_jax.train import loop
from mllm_jax.train.metrics import read_metrics
from train_main import TINY as BASE_TINY

TINY = BASE_TINY + ["ParallelConfig.data = 8"]


@pytest.fixture(autouse=True)
def _clean_gin():
    gin.clear_config()
    yield
    gin.clear_config()


def config(*extra):
    gin.clear_config()
    try:
        return loop.load_run_config(["configs/vlm_tiny.gin"], TINY + list(extra))
    finally:
        gin.clear_config()


def losses(workdir):
    return {r["step"]: r["loss"] for r in read_metrics(workdir)}


def saved_steps(workdir):
    return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())


def saved_arrays(workdir, step):
    """Every array of a saved step's state, read with Orbax directly (no model, no target)."""
    path = os.path.join(workdir, "checkpoints", str(step), "state")
    meta = ocp.StandardCheckpointer().metadata(path)
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one), tree)
    return jax.tree.leaves(ocp.StandardCheckpointer().restore(path, target))


def test_a_poisoned_update_is_never_saved_and_rotation_keeps_a_finite_checkpoint(tmp_path):
    """Two good steps, then (resumed with an infinite learning rate: only the model config must match) an update
    that makes the parameters non-finite while the step's own loss, computed before the update, is still finite."""
    base = ["TrainConfig.steps = 8", "TrainConfig.checkpoint_every = 1", "CheckpointConfig.keep = 2"]
    loop.run(config(*base), str(tmp_path), stop_after_step=2, log=lambda *_: None)
    poison = config(*base, "OptimizerConfig.learning_rate = 1e39")  # inf in float32
    with pytest.raises(loop.NonFiniteLossError, match=r"at step (\d+)") as info:
        loop.run(poison, str(tmp_path), log=lambda *_: None)
    bad = int(info.value.args[0].split(" at step ")[1].split(";")[0].split(" ")[0].rstrip(":,"))
    assert bad == 3, str(info.value)
    steps = saved_steps(str(tmp_path))
    assert steps and max(steps) == bad - 1, (steps, str(info.value))
    for step in steps:
        for x in saved_arrays(str(tmp_path), step):
            if np.issubdtype(np.asarray(x).dtype, np.floating):
                assert np.all(np.isfinite(np.asarray(x))), f"step {step} holds non-finite values"
    assert f"step {bad - 1}" in str(info.value)  # names the newest good checkpoint


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """6 uninterrupted steps, and a run stopped at step 4 with checkpoints at 2 and 4."""
    full = str(tmp_path_factory.mktemp("full"))
    loop.run(config("TrainConfig.steps = 6", "TrainConfig.checkpoint_every = 2"), full, log=lambda *_: None)
    part = str(tmp_path_factory.mktemp("part"))
    loop.run(config("TrainConfig.steps = 6", "TrainConfig.checkpoint_every = 2"), part, stop_after_step=4,
             log=lambda *_: None)
    assert saved_steps(part) == [2, 4]
    return full, part


def _largest_file(step_dir, under="state"):
    files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(step_dir, under)) for f in fs]
    return max(files, key=os.path.getsize)


def _truncate(step_dir):
    path = _largest_file(step_dir)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    return path


def _flip(step_dir):
    path = _largest_file(step_dir)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(size // 3)
        block = f.read(min(4096, size // 3))
        f.seek(size // 3)
        f.write(bytes(b ^ 0xFF for b in block))
    return path


def _corrupt_meta(step_dir):
    meta = os.path.join(step_dir, "meta")
    path = [os.path.join(meta, f) for f in os.listdir(meta)][0]
    with open(path, "w") as f:
        f.write('{"model_config": {"llm": ')
    return meta


def _empty(step_dir):
    for name in os.listdir(step_dir):
        full = os.path.join(step_dir, name)
        shutil.rmtree(full) if os.path.isdir(full) else os.remove(full)
    return step_dir


@pytest.mark.parametrize("damage", [_truncate, _flip, _corrupt_meta, _empty], ids=lambda f: f.__name__[1:])
def test_a_broken_newest_checkpoint_is_moved_aside_and_the_run_resumes_from_the_intact_one(reference, tmp_path,
                                                                                            damage):
    full, part = reference
    workdir = str(tmp_path / "w")
    shutil.copytree(part, workdir)
    damaged = damage(os.path.join(workdir, "checkpoints", "4"))
    lines = []
    summary = loop.run(config("TrainConfig.steps = 6", "TrainConfig.checkpoint_every = 2"), workdir,
                       log=lines.append)
    assert summary["start_step"] == 2 and summary["end_step"] == 6
    report = "\n".join(str(x) for x in lines)
    assert "step 4" in report and os.path.relpath(damaged, workdir).split(os.sep)[-1] in report, report
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "4.corrupt"))
    assert saved_steps(workdir) == [2, 4, 6]
    assert losses(workdir) == losses(full)  # one row per step, the uninterrupted run's values


def test_metrics_have_one_row_per_step_after_a_resume(reference, tmp_path):
    full, part = reference
    workdir = str(tmp_path / "w")
    shutil.copytree(part, workdir)
    shutil.rmtree(os.path.join(workdir, "checkpoints", "4"))  # as if killed before step 4's save committed
    loop.run(config("TrainConfig.steps = 6", "TrainConfig.checkpoint_every = 2"), workdir, log=lambda *_: None)
    steps = [r["step"] for r in read_metrics(workdir)]
    assert steps == [1, 2, 3, 4, 5, 6], steps
    assert losses(workdir) == losses(full)


def _dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_workdir_lock_refuses_a_live_holder_and_takes_over_a_stale_one(reference, tmp_path):
    _, part = reference
    workdir = str(tmp_path / "w")
    shutil.copytree(part, workdir)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        with open(os.path.join(workdir, "lock"), "w") as f:
            json.dump({"host": socket.gethostname(), "pid": holder.pid}, f)
        with open(os.path.join(workdir, "config.gin"), "w") as f:
            f.write("# the holder's\n")
        cfg = config("TrainConfig.steps = 6", "TrainConfig.checkpoint_every = 2")
        with pytest.raises(RuntimeError, match=rf"in use by another run.*{holder.pid}"):
            loop.run(cfg, workdir, config_text="# mine\n", log=lambda *_: None)
        assert open(os.path.join(workdir, "config.gin")).read() == "# the holder's\n"
        assert saved_steps(workdir) == [2, 4]
    finally:
        holder.kill()
        holder.wait()
    with open(os.path.join(workdir, "lock"), "w") as f:
        json.dump({"host": socket.gethostname(), "pid": _dead_pid()}, f)
    lines = []
    summary = loop.run(cfg, workdir, config_text="# mine\n", log=lines.append)
    assert summary["start_step"] == 4 and summary["end_step"] == 6
    assert any("stale lock" in str(x) for x in lines), lines
    assert not os.path.exists(os.path.join(workdir, "lock"))  # released at the end


def test_a_refused_workdir_is_not_modified(reference, tmp_path):
    _, part = reference
    workdir = str(tmp_path / "w")
    os.makedirs(workdir)
    shutil.copytree(os.path.join(part, "checkpoints"), os.path.join(workdir, "checkpoints"))
    for name in ("config.gin", "run_config.json", "tokenizer.json"):
        with open(os.path.join(workdir, name), "w") as f:
            f.write(f"original {name}\n")
    cfg = config("TrainConfig.steps = 8", "LLMConfig.d_ff = 96")
    with pytest.raises(ValueError, match=r"incompatible model.*llm.d_ff: checkpoint 64 vs now 96"):
        loop.run(cfg, workdir, config_text="# other model\n", log=lambda *_: None)
    for name in ("config.gin", "run_config.json", "tokenizer.json"):
        assert open(os.path.join(workdir, name)).read() == f"original {name}\n", name
    assert not os.path.exists(os.path.join(workdir, "lock"))


def test_sigint_requests_a_checkpoint_and_a_second_one_aborts():
    # Python's own handler first, whatever this process inherited (a background job starts with SIGINT ignored)
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with loop._Preemption() as preempt:
            assert signal.getsignal(signal.SIGINT) != signal.default_int_handler
            signal.raise_signal(signal.SIGINT)
            assert preempt.requested
            with pytest.raises(KeyboardInterrupt):
                signal.raise_signal(signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) == signal.default_int_handler  # what was there is restored
    finally:
        signal.signal(signal.SIGINT, inherited)
