"""mllm_jax.cpu_flags: the XLA:CPU flags train.py and benchmarks/throughput.py run with (not the tests)."""

import os
import subprocess
import sys

from mllm_jax import cpu_flags


def test_missing_defaults_are_appended_and_a_users_flag_is_kept():
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    assert cpu_flags.apply(env) == ["--xla_cpu_experimental_ynn_fusion_type="]
    assert env["XLA_FLAGS"] == "--xla_force_host_platform_device_count=8 --xla_cpu_experimental_ynn_fusion_type="
    assert cpu_flags.apply(env) == []  # idempotent
    mine = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=dot"}
    assert cpu_flags.apply(mine) == [] and mine["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type=dot"
    empty: dict = {}
    cpu_flags.apply(empty)
    assert empty["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type="


PROBE = """
import os, sys
sys.path.insert(0, {root!r})
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.pop("XLA_FLAGS", None)
if {apply}:
    from mllm_jax import cpu_flags
    cpu_flags.apply()
import jax, jax.numpy as jnp
x = jnp.ones((256, 256), jnp.float32)
print("__ynn_fusion" in jax.jit(lambda a, b: jnp.tanh(a @ b)).lower(x, x).compile().as_text())
"""


def test_the_flags_reach_xla_no_ynnpack_fusions():
    """Applied before jax starts (as train.py does), a compiled matmul is XLA's own dot; without them jaxlib makes a
    YNNPACK fusion of it (the oracle that the flag does something). Fresh processes with no XLA_FLAGS: the test
    process itself does not apply them."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = {}
    for apply in (True, False):
        proc = subprocess.run([sys.executable, "-c", PROBE.format(root=root, apply=apply)], capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        out[apply] = proc.stdout.strip().splitlines()[-1]
    assert out == {True: "False", False: "True"}
