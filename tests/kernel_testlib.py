"""Helpers shared by the attention-kernel tests (test_kernels_tiled, test_kernels_pallas_gpu):
random inputs and a cached, jitted (out, dq, dk, dv) of any attention implementation."""

import functools

import jax
import jax.numpy as jnp


def random_inputs(b, sq, sk, hq, hkv, d, dtype=jnp.float32, seed=0):
    """(q [b, sq, hq, d], k, v [b, sk, hkv, d], the output cotangent [b, sq, hq, d]), standard normal in ``dtype``."""
    kq, kk, kv, ko = jax.random.split(jax.random.PRNGKey(seed), 4)
    return (
        jax.random.normal(kq, (b, sq, hq, d), dtype),
        jax.random.normal(kk, (b, sk, hkv, d), dtype),
        jax.random.normal(kv, (b, sk, hkv, d), dtype),
        jax.random.normal(ko, (b, sq, hq, d), dtype),  # the output cotangent
    )


@functools.lru_cache(maxsize=None)
def value_and_grads(impl, opts):
    """jit(q, k, v, q_meta, k_meta, d_out) -> (out, dq, dk, dv) for impl with options (a hashable tuple)."""
    kw = dict(opts)

    def f(q, k, v, qm, km, d_out):
        out, vjp = jax.vjp(lambda q, k, v: impl(q, k, v, qm, km, **kw), q, k, v)
        return (out, *vjp(d_out))

    return jax.jit(f)
