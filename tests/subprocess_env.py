"""The environment for a subprocess a test starts (train.py, a benchmark, a notebook): this process's, with the
fake device count taken out of XLA_FLAGS (the child sets its own, e.g. train.py --cpu_devices; unset it has one
device) and the tests' other XLA flags and compilation cache kept (conftest.py)."""

import os
import re


def child_env(**extra: str) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", "")).strip()
    env["JAX_PLATFORMS"] = "cpu"
    env.update(extra)
    return env
