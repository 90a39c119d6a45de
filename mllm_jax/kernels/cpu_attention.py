"""Tile-skipping head-major attention for CPU (pure XLA, no Pallas): the CPU path for short and medium sequences.

The dense reference materialises [B, H, Sq, Sk] probabilities and walks them several times (mask, max, exp, sum,
divide; in the backward the softmax vjp and the stacked residuals of every layer). On packed multimodal rows most of
that square is empty: padding, other samples, the causal upper triangle. Here the sequence is cut into tiles of
``block_q`` x ``block_k`` and only the tiles the block map (kernels.meta) marks non-empty are ever computed:

- a loop over the q blocks that attend anything (all-padding q blocks are never visited: their output is 0),
  with an inner loop over that q block's non-empty k blocks (kernels.blockwise.compact), online softmax across them;
- every tile is two plain 3-d batched matmuls over the kv heads in the head-major layout ([Hkv, G * bq, D] rows:
  the query heads of a group folded into the rows), which XLA CPU runs much faster than the 5-d einsums of the
  sequence-major layout;
- the backward (custom_vjp) saves only the output and the row log-sum-exp and recomputes each tile's probabilities
  (flash-attention style), with the row term delta = sum(dO * O) computed from [S, D] arrays, never from [S, S].

Same function as kernels.reference (rows that attend nothing give 0 and zero gradients), up to float32 rounding.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from mllm_jax.kernels._common import DEFAULT_BLOCK  # noqa: F401  (public here, as before)
from mllm_jax.kernels._common import (check_gqa, check_positive_int, check_softcap, config_fields, config_type, default_block,
                             per_config_vjp)
from mllm_jax.kernels.blockwise import compact
from mllm_jax.kernels.meta import TokenMeta, block_map, mask as mask_rule

_Cfg = config_type("_Cfg")


def _pad_to(x, axis, multiple):
    pad = -x.shape[axis] % multiple
    if not pad:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths)


def _meta_padded(meta, block):
    return TokenMeta(*(_pad_to(jnp.asarray(a, jnp.int32), 1, block) for a in meta))


def _slice_meta(meta: TokenMeta, b, start, size):
    return TokenMeta(*(jax.lax.dynamic_slice(a, (b, start), (1, size)) for a in meta))


class _Plan(NamedTuple):
    """The q blocks to visit (active first) and, per q block, its non-empty k blocks."""

    q_order: jax.Array  # int32 [B * nQ]: flat (b, qi) indices, the n_active ones that attend anything first
    n_active: jax.Array  # int32 []
    k_blocks: jax.Array  # int32 [B, nQ, nK]
    count: jax.Array  # int32 [B, nQ]


def _plan(cfg: _Cfg, qm, km) -> _Plan:
    bm = block_map(qm, km, cfg.block_q, cfg.block_k, window=cfg.window, span_isolated=cfg.span_isolated, xp=jnp)
    sched = compact(bm)
    flat = sched.count.reshape(-1)
    q_order = jnp.argsort(flat == 0, stable=True).astype(jnp.int32)
    return _Plan(q_order, jnp.sum(flat > 0).astype(jnp.int32), sched.k_blocks, sched.count)


def _tile_logits(cfg: _Cfg, q_t, k_t, qm_t, km_t, g):
    """Masked (softcapped) logits [Hkv, G * bq, bk] of one tile (q_t already scaled), and tanh for the softcap vjp."""
    hkv, r, _ = q_t.shape
    bq = r // g
    s = jnp.einsum("hrd,hkd->hrk", q_t, k_t, preferred_element_type=jnp.float32)
    t = None
    if cfg.softcap is not None:
        t = jnp.tanh(s / cfg.softcap)
        s = cfg.softcap * t
    m = mask_rule(qm_t, km_t, window=cfg.window, span_isolated=cfg.span_isolated)[0]  # [bq, bk]
    s = jnp.where(m[None, None], s.reshape(hkv, g, bq, -1), -jnp.inf).reshape(hkv, r, -1)
    return s, t


def _q_rows(qh, b, qi, bq):
    """[Hkv, G * bq, D] rows of q block qi of batch row b from qh [B, Hkv, G, Sq, D]."""
    _, hkv, g, _, d = qh.shape
    return jax.lax.dynamic_slice(qh, (b, 0, 0, qi * bq, 0), (1, hkv, g, bq, d))[0].reshape(hkv, g * bq, d)


def _kv_rows(xh, b, kj, bk):
    _, hkv, _, d = xh.shape
    return jax.lax.dynamic_slice(xh, (b, 0, kj * bk, 0), (1, hkv, bk, d))[0]


def _forward(cfg: _Cfg, qh, kh, vh, qm, km, plan: _Plan):
    """qh [B, Hkv, G, Sq, D] (scaled), kh/vh [B, Hkv, Sk, D], padded to whole blocks.

    Returns out [B, Hkv, G, Sq, D] float32 and lse [B, Hkv, G, Sq] (-inf where a row sees nothing).
    """
    b_, hkv, g, sq, d = qh.shape
    bq, bk = cfg.block_q, cfg.block_k
    nq = sq // bq

    def q_block(i, carry):
        out, lse = carry
        t = plan.q_order[i]
        b, qi = t // nq, t % nq
        q_t = _q_rows(qh, b, qi, bq)
        qm_t = _slice_meta(qm, b, qi * bq, bq)

        def k_tile(j, c):
            m_i, l_i, acc = c
            kj = plan.k_blocks[b, qi, j]
            s, _ = _tile_logits(cfg, q_t, _kv_rows(kh, b, kj, bk), qm_t, _slice_meta(km, b, kj * bk, bk), g)
            m_new = jnp.maximum(m_i, jnp.max(s, axis=-1))
            m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
            p = jnp.exp(s - m_safe[..., None])
            alpha = jnp.exp(m_i - m_safe)
            pv = jnp.einsum("hrk,hkd->hrd", p.astype(vh.dtype), _kv_rows(vh, b, kj, bk),
                            preferred_element_type=jnp.float32)
            return m_new, alpha * l_i + jnp.sum(p, axis=-1), alpha[..., None] * acc + pv

        init = (jnp.full((hkv, g * bq), -jnp.inf, jnp.float32), jnp.zeros((hkv, g * bq), jnp.float32),
                jnp.zeros((hkv, g * bq, d), jnp.float32))
        m_i, l_i, acc = jax.lax.fori_loop(0, plan.count[b, qi], k_tile, init)
        seen = l_i > 0
        safe_l = jnp.where(seen, l_i, 1.0)
        o = jnp.where(seen[..., None], acc / safe_l[..., None], 0.0)
        row_lse = jnp.where(seen, m_i + jnp.log(safe_l), -jnp.inf)
        out = jax.lax.dynamic_update_slice(out, o.reshape(1, hkv, g, bq, d), (b, 0, 0, qi * bq, 0))
        lse = jax.lax.dynamic_update_slice(lse, row_lse.reshape(1, hkv, g, bq), (b, 0, 0, qi * bq))
        return out, lse

    init = (jnp.zeros(qh.shape, jnp.float32), jnp.full(qh.shape[:-1], -jnp.inf, jnp.float32))
    return jax.lax.fori_loop(0, plan.n_active, q_block, init)


def _backward(cfg: _Cfg, qh, kh, vh, qm, km, plan: _Plan, lse, delta, doh):
    """(dq w.r.t. the scaled q, dk, dv) float32 in the padded head-major layouts, over the same tiles."""
    b_, hkv, g, sq, d = qh.shape
    bq, bk = cfg.block_q, cfg.block_k
    nq = sq // bq
    lse = jnp.where(jnp.isfinite(lse), lse, jnp.inf)  # rows that see nothing: p = exp(-inf) = 0

    def q_block(i, carry):
        dq, dk, dv = carry
        t = plan.q_order[i]
        b, qi = t // nq, t % nq
        q_t, do_t = _q_rows(qh, b, qi, bq), _q_rows(doh, b, qi, bq)
        lse_t = jax.lax.dynamic_slice(lse, (b, 0, 0, qi * bq), (1, hkv, g, bq)).reshape(hkv, g * bq)
        delta_t = jax.lax.dynamic_slice(delta, (b, 0, 0, qi * bq), (1, hkv, g, bq)).reshape(hkv, g * bq)
        qm_t = _slice_meta(qm, b, qi * bq, bq)

        def k_tile(j, c):
            dq_t, dk, dv = c
            kj = plan.k_blocks[b, qi, j]
            k_t, v_t = _kv_rows(kh, b, kj, bk), _kv_rows(vh, b, kj, bk)
            s, tanh_s = _tile_logits(cfg, q_t, k_t, qm_t, _slice_meta(km, b, kj * bk, bk), g)
            p = jnp.exp(s - lse_t[..., None])  # [Hkv, G * bq, bk]
            dv_t = jnp.einsum("hrk,hrd->hkd", p.astype(doh.dtype), do_t, preferred_element_type=jnp.float32)
            dp = jnp.einsum("hrd,hkd->hrk", do_t, v_t, preferred_element_type=jnp.float32)
            ds = p * (dp - delta_t[..., None])
            if cfg.softcap is not None:
                ds = ds * (1.0 - tanh_s * tanh_s)
            dq_t = dq_t + jnp.einsum("hrk,hkd->hrd", ds.astype(kh.dtype), k_t, preferred_element_type=jnp.float32)
            dk_t = jnp.einsum("hrk,hrd->hkd", ds.astype(qh.dtype), q_t, preferred_element_type=jnp.float32)
            at = (b, 0, kj * bk, 0)
            dk = jax.lax.dynamic_update_slice(dk, jax.lax.dynamic_slice(dk, at, (1, hkv, bk, d)) + dk_t[None], at)
            dv = jax.lax.dynamic_update_slice(dv, jax.lax.dynamic_slice(dv, at, (1, hkv, bk, d)) + dv_t[None], at)
            return dq_t, dk, dv

        dq_t, dk, dv = jax.lax.fori_loop(0, plan.count[b, qi], k_tile,
                                         (jnp.zeros((hkv, g * bq, d), jnp.float32), dk, dv))
        dq = jax.lax.dynamic_update_slice(dq, dq_t.reshape(1, hkv, g, bq, d), (b, 0, 0, qi * bq, 0))
        return dq, dk, dv

    init = (jnp.zeros(qh.shape, jnp.float32), jnp.zeros(kh.shape, jnp.float32), jnp.zeros(vh.shape, jnp.float32))
    return jax.lax.fori_loop(0, plan.n_active, q_block, init)


def _to_heads(cfg: _Cfg, q, k, v):
    """q [B, Sq, Hq, D] -> scaled [B, Hkv, G, Sq_pad, D]; k, v [B, Sk, Hkv, D] -> [B, Hkv, Sk_pad, D]."""
    b, sq, hq, d = q.shape
    hkv = k.shape[2]
    qh = jnp.transpose((q * jnp.asarray(cfg.scale, q.dtype)).reshape(b, sq, hkv, hq // hkv, d), (0, 2, 3, 1, 4))
    return (_pad_to(qh, 3, cfg.block_q), _pad_to(jnp.swapaxes(k, 1, 2), 2, cfg.block_k),
            _pad_to(jnp.swapaxes(v, 1, 2), 2, cfg.block_k))


def _from_heads(xh, sq):
    """[B, Hkv, G, Sq_pad, D] -> [B, Sq, Hkv * G, D]."""
    b, hkv, g, _, d = xh.shape
    return jnp.transpose(xh[:, :, :, :sq], (0, 3, 1, 2, 4)).reshape(b, sq, hkv * g, d)


@per_config_vjp
def _make_attention(cfg: _Cfg):
    def fwd(q, k, v, q_meta, k_meta):
        qm, km = _meta_padded(q_meta, cfg.block_q), _meta_padded(k_meta, cfg.block_k)
        plan = _plan(cfg, qm, km)
        qh, kh, vh = _to_heads(cfg, q, k, v)
        out, lse = _forward(cfg, qh, kh, vh, qm, km, plan)
        o = out.astype(q.dtype)
        return _from_heads(o, q.shape[1]), (q, k, v, q_meta, k_meta, o, lse)

    def bwd(res, d_o):
        q, k, v, q_meta, k_meta, o, lse = res
        b, sq, hq, d = q.shape
        sk, hkv = k.shape[1], k.shape[2]
        qm, km = _meta_padded(q_meta, cfg.block_q), _meta_padded(k_meta, cfg.block_k)
        plan = _plan(cfg, qm, km)
        qh, kh, vh = _to_heads(cfg, q, k, v)
        doh = _pad_to(jnp.transpose(d_o.reshape(b, sq, hkv, hq // hkv, d), (0, 2, 3, 1, 4)), 3, cfg.block_q)
        delta = jnp.sum(doh.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)  # [B, Hkv, G, Sq_pad]
        dqh, dkh, dvh = _backward(cfg, qh, kh, vh, qm, km, plan, lse, delta, doh)
        dq = (_from_heads(dqh, sq) * cfg.scale).astype(q.dtype)
        dk = jnp.swapaxes(dkh[:, :, :sk], 1, 2).astype(k.dtype)
        dv = jnp.swapaxes(dvh[:, :, :sk], 1, 2).astype(v.dtype)
        return dq, dk, dv, None, None

    return fwd, bwd


def tiled_attention(q, k, v, q_meta: TokenMeta, k_meta: TokenMeta, *, block_q=None, block_k=None, scale=None,
                    window=None, softcap=None, span_isolated=False):
    """q [B, Sq, Hq, D], k/v [B, Sk, Hkv, D] -> [B, Sq, Hq, D] under the mask rule of kernels.meta (GQA when
    Hq > Hkv). Only non-empty tiles are computed; rows that attend nothing return 0 (and zero gradients)."""
    check_gqa(q.shape[2], k.shape[2])
    for name, val in (("block_q", block_q), ("block_k", block_k), ("window", window)):
        check_positive_int(name, val)
    check_softcap(softcap)
    cfg = _Cfg(**config_fields(int(block_q or default_block(q.shape[1])), int(block_k or default_block(k.shape[1])),
                               q.shape[-1], scale, window, softcap, span_isolated))
    return _make_attention(cfg)(q, k, v, TokenMeta(*q_meta), TokenMeta(*k_meta))
