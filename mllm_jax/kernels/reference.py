"""Dense masked attention in pure JAX: the numerical oracle for every other implementation, and the CPU path for
short sequences. Materialises [B, H, Sq, Sk]; use the blockwise path for long sequences."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mllm_jax.kernels.meta import TokenMeta, mask as mask_rule


def reference_attention(
    q_BQHD,
    k_BKGD,
    v_BKGD,
    q_meta: TokenMeta,
    k_meta: TokenMeta,
    *,
    scale: float | None = None,
    window: int | None = None,
    softcap: float | None = None,
    span_isolated: bool = False,
):
    """q [B, Sq, Hq, D], k/v [B, Sk, Hkv, D] -> [B, Sq, Hq, D]. Rows that attend nothing return 0 (and zero grads)."""
    b, sq, hq, d = q_BQHD.shape
    hkv = k_BKGD.shape[2]
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
    scale = d**-0.5 if scale is None else scale
    group = hq // hkv
    q = q_BQHD.reshape(b, sq, hkv, group, d)
    logits = jnp.einsum("bqhgd,bkhd->bhgqk", q, k_BKGD, preferred_element_type=jnp.float32) * scale
    if softcap is not None:
        logits = softcap * jnp.tanh(logits / softcap)
    m_BQK = mask_rule(q_meta, k_meta, window=window, span_isolated=span_isolated)
    m = m_BQK[:, None, None]
    logits = jnp.where(m, logits, -jnp.inf)
    row_max = jnp.max(logits, axis=-1, keepdims=True)
    row_max = jax.lax.stop_gradient(jnp.where(jnp.isfinite(row_max), row_max, 0.0))
    p = jnp.where(m, jnp.exp(logits - row_max), 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom > 0, denom, 1.0)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", p.astype(v_BKGD.dtype), v_BKGD, preferred_element_type=jnp.float32)
    return out.reshape(b, sq, hq, d).astype(q_BQHD.dtype)
