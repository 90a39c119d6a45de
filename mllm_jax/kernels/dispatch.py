"""One entry point for attention: ``kernels.attention``. Picks the implementation by backend (Pallas on GPU/TPU, pure
JAX on CPU) and validates shapes before anything is traced into a kernel."""

from __future__ import annotations

import jax
import numpy as np

from mllm_jax.kernels.meta import TokenMeta

IMPLS = ("auto", "xla", "dense", "pallas_gpu", "pallas_tpu")
# Below this many keys the dense reference is as fast as the blockwise path on CPU and simpler to differentiate.
DENSE_MAX_KEYS = 1024
# The model's own CPU path (mllm_jax.layers.attend) runs kernels.cpu_attention (tile-skipping, head-major) from this
# many keys up to DENSE_MAX_KEYS and its dense head-major attention below it: on vlm_small's shapes (2 cores, fp32,
# forward + backward of one layer) the tiled path is 2.4x faster at 512 causal keys and 6x on packed rows with
# padding, while at 197 keys with a full mask (the ViT) the dense one is 1.8x faster.
TILED_MIN_KEYS = 256


def _check(q, k, v, q_meta: TokenMeta, k_meta: TokenMeta):
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be [B, S, H, D]; got shapes {q.shape}, {k.shape}, {v.shape}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape; got {k.shape} and {v.shape}")
    b, sq, hq, d = q.shape
    if k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"k batch/head_dim {k.shape[0]}/{k.shape[3]} do not match q's {b}/{d}")
    if hq % k.shape[2]:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({k.shape[2]})")
    for name, meta, want in (("q_meta", q_meta, (b, sq)), ("k_meta", k_meta, (b, k.shape[1]))):
        shapes = [tuple(np.shape(a)) for a in meta]
        if any(s != want for s in shapes):
            raise ValueError(f"{name} arrays must have shape {want} (batch, length of {name[0]}); got {shapes}")


def default_impl() -> str:
    backend = jax.default_backend()
    return {"gpu": "pallas_gpu", "cuda": "pallas_gpu", "tpu": "pallas_tpu"}.get(backend, "xla")


def attention(
    q,
    k,
    v,
    q_meta: TokenMeta,
    k_meta: TokenMeta,
    *,
    impl: str = "auto",
    interpret: bool = False,
    scale: float | None = None,
    window: int | None = None,
    softcap: float | None = None,
    span_isolated: bool = False,
    block_q: int | None = None,
    block_k: int | None = None,
):
    """Masked multi-head attention. q [B, Sq, Hq, D], k and v [B, Sk, Hkv, D] -> [B, Sq, Hq, D].

    The mask is the rule of kernels.meta applied to q_meta and k_meta, which are given separately so any permutation
    of the tokens (context parallelism) is exact. Rows that attend nothing return 0.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}; got {impl!r}")
    _check(q, k, v, q_meta, k_meta)
    if impl == "auto":
        impl = default_impl()
    kw = dict(scale=scale, window=window, softcap=softcap, span_isolated=span_isolated)
    if impl == "xla" and k.shape[1] <= DENSE_MAX_KEYS:
        impl = "dense"
    if impl == "dense":
        from mllm_jax.kernels.reference import reference_attention

        return reference_attention(q, k, v, q_meta, k_meta, **kw)
    if impl == "xla":
        from mllm_jax.kernels.blockwise import blockwise_attention

        return blockwise_attention(q, k, v, q_meta, k_meta, block_q=block_q, block_k=block_k, **kw)
    if impl == "pallas_gpu":
        from mllm_jax.kernels.pallas_gpu import flash_attention

        return flash_attention(q, k, v, q_meta, k_meta, block_q=block_q, block_k=block_k, interpret=interpret, **kw)
    from mllm_jax.kernels.pallas_tpu import flash_attention

    return flash_attention(q, k, v, q_meta, k_meta, block_q=block_q, block_k=block_k, interpret=interpret, **kw)
