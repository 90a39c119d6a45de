"""Dense masked attention in pure JAX; both materialise [B, H, Sq, Sk] (kernels.tiled is the path for long keys).

- ``reference_attention``: the numerical oracle for every other implementation (the plain 5-d einsum form).
- ``head_major_attention``: the same function laid out for speed, the ``dense`` path of kernels.attention (short keys
  on CPU, where it takes a mask precomputed once for all layers)."""

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


def head_major_attention(q_BQHD, k_BKGD, v_BKGD, mask_BQK, *, scale=None, softcap=None):
    """Dense masked attention with heads moved ahead of the sequence before the two S x S matmuls; ``mask_BQK`` is
    the rule of kernels.meta as a dense bool [B, Sq, Sk] (kernels.mask).

    The same function as ``reference_attention`` (rows that attend nothing give 0, with zero gradients), laid out so
    both matmuls are plain 4-d batched products over (batch, kv head) with the query heads of a group folded into the
    rows: on CPU the reference's 'bqhgd,bkhd->bhgqk' contraction runs about 3x slower in training (a 5-d einsum,
    even with a group of 1, is about 1.5x slower than the 4-d one). Masked logits are the most negative finite float
    (not -inf) so fully masked rows stay finite; they are zeroed at the output.
    """
    b, sq, hq, d = q_BQHD.shape
    sk, hkv = k_BKGD.shape[1], k_BKGD.shape[2]
    g = hq // hkv
    scale = d**-0.5 if scale is None else scale
    q_BHRD = jnp.transpose((q_BQHD * jnp.asarray(scale, q_BQHD.dtype)).reshape(b, sq, hkv, g, d), (0, 2, 3, 1, 4))
    q_BHRD = q_BHRD.reshape(b, hkv, g * sq, d)  # rows r = (group member, query)
    k_BHKD = jnp.swapaxes(k_BKGD, 1, 2)
    v_BHKD = jnp.swapaxes(v_BKGD, 1, 2)
    logits = jnp.einsum("bhrd,bhkd->bhrk", q_BHRD, k_BHKD, preferred_element_type=jnp.float32)
    if softcap is not None:
        logits = softcap * jnp.tanh(logits / softcap)
    mask_BRK = jnp.tile(mask_BQK, (1, g, 1)) if g > 1 else mask_BQK  # every group member has its query's mask
    logits = jnp.where(mask_BRK[:, None], logits, jnp.finfo(jnp.float32).min)
    p = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bhrk,bhkd->bhrd", p.astype(v_BKGD.dtype), v_BHKD, preferred_element_type=jnp.float32)
    out = jnp.where(jnp.any(mask_BRK, axis=-1)[:, None, :, None], out, 0.0)
    out = jnp.transpose(out.reshape(b, hkv, g, sq, d), (0, 3, 1, 2, 4))
    return out.reshape(b, sq, hq, d).astype(q_BQHD.dtype)
