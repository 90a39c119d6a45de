"""Helpers shared by the attention-kernel tests (test_kernels_tiled, test_kernels_pallas_gpu, test_kernels_pallas_tpu):
random inputs, a cached, jitted (out, dq, dk, dv) of any attention implementation, and a compile for a target."""

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


def compile_on_one_device(target: str, fn, *specs):
    """``jax.jit(fn).lower(*specs).compile()`` on one device of ``target`` (e.g. "tpu:v5e:1x1", "gpu:h100:1x1") with
    that target's own compiler (libtpu's XLA:TPU and Mosaic; the deviceless CUDA back end and Triton), arguments
    replicated. Returns (compiled, its HLO text). A kernel the compiler refuses raises here."""
    import os

    from jax.sharding import NamedSharding, PartitionSpec

    from mllm_jax.train import targets

    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    device = targets.parse(target).devices()[0]
    mesh = jax.make_mesh((1,), ("x",), devices=[device])
    place = lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=NamedSharding(mesh, PartitionSpec()))  # noqa: E731
    args = jax.tree.map(place, specs)
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled, compiled.as_text()
