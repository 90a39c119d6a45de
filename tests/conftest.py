"""Every test process sees 8 fake CPU devices (docs/architecture.md: 'How things are proved without an accelerator').

Test speed: most of the suite's time is XLA compiling small programs on 2 cores. So the tests compile with the
backend's LLVM optimisation off (``--xla_backend_optimization_level=0``: 2-3x faster compiles; the tiny models' run
time hardly matters, and every oracle is computed in the same process or under the same flags), and one persistent
compilation cache, fresh for each session, is shared by this process and the train.py subprocesses it starts
(``subprocess_env.child_env``), so a program compiled again (a resumed run, a reference run) compiles once.
"""
import os
import shutil
import tempfile

TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"

_flags = os.environ.get("XLA_FLAGS", "")
os.environ["XLA_FLAGS"] = " ".join(  # idempotent: pytest-xdist's workers inherit the flags already set
    [_flags] + [f for f in ("--xla_force_host_platform_device_count=8", TEST_XLA_FLAGS) if f not in _flags]
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Made by the first process (pytest-xdist's workers and the subprocesses inherit it), removed by it at the end.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="mllm_jax_tests_xla_cache_")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", False)


def pytest_unconfigure(config):
    if _OWN_CACHE:
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
