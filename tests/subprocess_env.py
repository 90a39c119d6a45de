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
