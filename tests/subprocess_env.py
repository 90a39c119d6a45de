"""The environment for a subprocess a test starts (train.py, a benchmark, a notebook): this process's, with the
fake device count taken out of XLA_FLAGS (the child sets its own, e.g. train.py --cpu_devices; unset it has one
device) and the tests' other XLA flags and compilation cache kept (conftest.py)."""

import os

from mllm_jax.distributed import without_cpu_device_count


def child_env() -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = without_cpu_device_count(env.get("XLA_FLAGS", ""))
    env["JAX_PLATFORMS"] = "cpu"
    return env


def metrics_rows(workdir: str) -> list:
    """metrics.jsonl's rows so far; none while the file is missing or its last line is half written."""
    from mllm_jax.train.metrics import read_metrics

    try:
        return read_metrics(workdir)
    except (FileNotFoundError, ValueError):
        return []


def check_signal_saves_last_step(cmd, workdir: str, sig, *, cwd: str, wait_s: float = 400) -> None:
    """Start train.py (``cmd``), send ``sig`` once two metrics rows exist, and check the run exits 0, says which
    signal it got, and leaves exactly one checkpoint: the last logged step."""
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(cmd, cwd=cwd, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + wait_s
    while time.time() < deadline and proc.poll() is None and len(metrics_rows(workdir)) < 2:
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    last = metrics_rows(workdir)[-1]["step"]
    saved = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
    assert saved == [last] and signal.Signals(sig).name in stdout, (saved, last, stdout[-2000:])
