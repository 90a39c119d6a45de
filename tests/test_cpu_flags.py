"""mllm_jax.cpu_flags: the XLA:CPU flags train.py, the benchmarks and these tests run with."""

import jax
import jax.numpy as jnp

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


def test_the_flags_reach_xla_no_ynnpack_fusions():
    """conftest applied them before jax started: a compiled matmul is XLA's own dot, not a YNNPACK fusion (which
    jaxlib makes of it by default)."""
    x = jnp.ones((256, 256), jnp.float32)
    hlo = jax.jit(lambda a, b: jnp.tanh(a @ b)).lower(x, x).compile().as_text()
    assert "dot" in hlo and "__ynn_fusion" not in hlo
