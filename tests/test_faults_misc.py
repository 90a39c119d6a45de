"""Nothing hangs, and bad command lines say what is wrong (issue 17):

- ``--gin_file`` resolves against the working directory, then the repository's configs/ (and root); a missing
  recipe is a FileNotFoundError naming every place looked;
- benchmarks/throughput.py: a worker that dies (an exception, or killed) is reported with its error and the
  benchmark fails instead of waiting forever;
- the distributed start-up has a timeout and says which coordinator address and process it is waiting for.
"""

import os
import subprocess
import sys
import textwrap

import gin
import pytest

from mllm_jax import gin_setup
from subprocess_env import child_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _clean_gin():
    gin.clear_config()
    yield
    gin.clear_config()


def test_recipe_paths_resolve_from_anywhere_and_missing_ones_name_every_place(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("configs/vlm_tiny.gin", "vlm_tiny.gin", "vlm_tiny"):
        assert gin_setup.resolve_gin_file(name) == os.path.join(ROOT, "configs", "vlm_tiny.gin"), name
    (tmp_path / "mine.gin").write_text("TrainConfig.steps = 3\n")
    assert gin_setup.resolve_gin_file("mine.gin") == str(tmp_path / "mine.gin")
    with pytest.raises(FileNotFoundError) as info:
        gin_setup.parse(["configs/vlm_tnyi.gin"])
    msg = str(info.value)
    for place in (str(tmp_path / "configs" / "vlm_tnyi.gin"), os.path.join(ROOT, "configs", "configs",
                                                                             "vlm_tnyi.gin")):
        assert place in msg, msg
    assert "vlm_tnyi.gin" in msg and "configs/vlm_tiny.gin" in msg  # the recipes that do exist


def test_benchmark_worker_death_is_reported_not_waited_for(tmp_path):
    """A worker whose config fails (an exception) and one that is killed outright: both end the benchmark with the
    worker's error within seconds (the old code blocked forever on the pipe)."""
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {ROOT!r})
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        from benchmarks import throughput as t
        try:
            t.time_interleaved(["jax"], True, "float32", ["NoSuchConfigurable.x = 1"], (8, 1), 0, 1)
        except RuntimeError as e:
            print("REPORTED:", e)
        else:
            sys.exit("no error")
        import multiprocessing, threading, time

        def killer():
            while not multiprocessing.active_children():
                time.sleep(0.05)
            time.sleep(0.5)
            os.kill(multiprocessing.active_children()[0].pid, signal.SIGKILL)

        threading.Thread(target=killer, daemon=True).start()
        try:
            t.time_interleaved(["jax"], True, "float32", [], (8, 1), 0, 1)
        except RuntimeError as e:
            print("REPORTED:", e)
        else:
            sys.exit("no error")
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=child_env(), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    reported = [line for line in out.stdout.splitlines() if line.startswith("REPORTED:")]
    assert len(reported) == 2, out.stdout
    assert "jax worker" in reported[0] and "NoSuchConfigurable" in reported[0], reported[0]
    assert "jax worker" in reported[1] and ("SIGKILL" in reported[1] or "exit code -9" in reported[1]), reported[1]


def test_distributed_start_up_times_out_naming_the_coordinator():
    """Process 1 of 2 with nobody listening at the coordinator address: a clear error within the timeout."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = textwrap.dedent(f"""
        from mllm_jax import distributed
        distributed.initialize("127.0.0.1:{port}", 2, 1, timeout_s=5)
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=child_env(), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode != 0
    err = out.stderr
    assert f"127.0.0.1:{port}" in err and "process 1 of 2" in err and "5 s" in err, err[-3000:]
    assert "RuntimeError: distributed start-up failed" in err and "Check failure" not in err, err[-3000:]
