"""Tiled (flash-style) attention in pure JAX: the XLA path for every key count where a dense [Sq, Sk] square would
be wasteful, and the per-step math of ring context parallelism.

The sequence is cut into tiles of ``block_q`` x ``block_k`` and only the tiles the block map (kernels.meta) marks
non-empty are ever computed (really skipped, not masked):

- ``tile_plan`` compacts the block map into, per q block, the list of its non-empty k blocks (kernels.meta.compact)
  and orders the q blocks so those that attend anything come first; all-padding q blocks are never visited (their
  output is 0, their lse -inf);
- a ``fori_loop`` over the live q blocks runs, for each, a ``fori_loop`` over its k blocks with an online softmax.
  Nothing is vmapped over the tile loops (under vmap a data-dependent loop would compute every tile);
- every tile is two plain 3-d batched matmuls over the kv heads in the head-major layout ([Hkv, G * bq, D] rows: the
  query heads of a group folded into the rows), which XLA:CPU runs much faster than 5-d sequence-major einsums;
- the backward (custom_vjp) saves only the output and the row log-sum-exp and recomputes each tile's probabilities,
  with the row term delta = sum(dO * O) computed from [S, D] arrays, never from [S, S].

The loops index the batch dimension, so the arrays must be whole on this device (no mesh, or inside shard_map):
``kernels.attention`` runs this per shard under shard_map when the batch or heads are sharded.

For attention split over K/V shards (ring context parallelism) the log-sum-exp is public ([B, Hq, Sq] float32, -inf
for rows that see nothing): ``tiled_attention_with_lse`` (differentiable in out and lse) and the pair
``tiled_attention_fwd_block`` / ``tiled_attention_bwd_block``, whose backward takes the lse and row term merged over
all shards so the caller's own vjp can sum per-shard gradients.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from mllm_jax.kernels._common import DEFAULT_BLOCK  # noqa: F401  (public here)
from mllm_jax.kernels._common import (check_gqa, check_positive_int, check_softcap, config_fields, config_type,
                                      default_block, per_config_vjp)
from mllm_jax.kernels.meta import TileSchedule, TokenMeta, block_map, compact, mask as mask_rule

_Cfg = config_type("_Cfg")


def tile_schedule(q_meta, k_meta, block_q, block_k, *, window=None, span_isolated=False) -> TileSchedule:
    """Compacted per-q-block lists of the k blocks to compute, from the jnp block map (same on host and device)."""
    bm = block_map(TokenMeta(*map(jnp.asarray, q_meta)), TokenMeta(*map(jnp.asarray, k_meta)), block_q, block_k,
                   window=window, span_isolated=span_isolated, xp=jnp)
    return compact(bm)


class _Plan(NamedTuple):
    """The q blocks to visit (live ones first) and, per q block, its non-empty k blocks."""

    q_order: jax.Array  # int32 [B * nQ]: flat (b, qi) indices, the n_live ones that attend anything first
    n_live: jax.Array  # int32 []
    k_blocks: jax.Array  # int32 [B, nQ, nK]
    count: jax.Array  # int32 [B, nQ]


def tile_plan(cfg: _Cfg, qm, km) -> _Plan:
    sched = tile_schedule(qm, km, cfg.block_q, cfg.block_k, window=cfg.window, span_isolated=cfg.span_isolated)
    flat = sched.count.reshape(-1)
    q_order = jnp.argsort(flat == 0, stable=True).astype(jnp.int32)
    return _Plan(q_order, jnp.sum(flat > 0).astype(jnp.int32), sched.k_blocks, sched.count)


# ------------------------------------------------------------------------------------------------- the tile loops


def _slice_meta(meta: TokenMeta, b, start, size):
    return TokenMeta(*(jax.lax.dynamic_slice(a, (b, start), (1, size)) for a in meta))


def _tile_logits(cfg: _Cfg, q_t, k_t, qm_t, km_t, g):
    """Masked (softcapped) logits [Hkv, G * bq, bk] of one tile (q_t already scaled), and tanh for the softcap vjp."""
    hkv, r, _ = q_t.shape
    s = jnp.einsum("hrd,hkd->hrk", q_t, k_t, preferred_element_type=jnp.float32)
    t = None
    if cfg.softcap is not None:
        t = jnp.tanh(s / cfg.softcap)
        s = cfg.softcap * t
    m = mask_rule(qm_t, km_t, window=cfg.window, span_isolated=cfg.span_isolated)[0]  # [bq, bk]
    s = jnp.where(m[None, None], s.reshape(hkv, g, r // g, -1), -jnp.inf).reshape(hkv, r, -1)
    return s, t


def _q_rows(x_BHGSD, b, qi, bq):
    """[Hkv, G * bq, D] rows of q block qi of batch row b."""
    _, hkv, g, _, d = x_BHGSD.shape
    return jax.lax.dynamic_slice(x_BHGSD, (b, 0, 0, qi * bq, 0), (1, hkv, g, bq, d))[0].reshape(hkv, g * bq, d)


def _q_row_stats(x_BHGS, b, qi, bq):
    _, hkv, g, _ = x_BHGS.shape
    return jax.lax.dynamic_slice(x_BHGS, (b, 0, 0, qi * bq), (1, hkv, g, bq)).reshape(hkv, g * bq)


def _kv_rows(x_BHSD, b, kj, bk):
    _, hkv, _, d = x_BHSD.shape
    return jax.lax.dynamic_slice(x_BHSD, (b, 0, kj * bk, 0), (1, hkv, bk, d))[0]


def _forward(cfg: _Cfg, qh, kh, vh, qm, km, plan: _Plan):
    """qh [B, Hkv, G, Sq, D] (scaled), kh/vh [B, Hkv, Sk, D], padded to whole blocks.

    Returns out [B, Hkv, G, Sq, D] float32, lse [B, Hkv, G, Sq] (-inf where a row sees nothing) and the number of
    tiles computed (counted inside the loop body, for the benchmarks and tests).
    """
    _, hkv, g, sq, d = qh.shape
    bq, bk = cfg.block_q, cfg.block_k
    nq = sq // bq

    def q_block(i, carry):
        out, lse, n_tiles = carry
        t = plan.q_order[i]
        b, qi = t // nq, t % nq
        q_t = _q_rows(qh, b, qi, bq)
        qm_t = _slice_meta(qm, b, qi * bq, bq)

        def k_tile(j, c):
            m_i, l_i, acc = c
            kj = plan.k_blocks[b, qi, j]
            s, _ = _tile_logits(cfg, q_t, _kv_rows(kh, b, kj, bk), qm_t, _slice_meta(km, b, kj * bk, bk), g)
            m_new = jnp.maximum(m_i, jnp.max(s, axis=-1))
            m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)  # rows with nothing yet: exp(-inf - 0) = 0
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
        return out, lse, n_tiles + plan.count[b, qi]

    init = (jnp.zeros(qh.shape, jnp.float32), jnp.full(qh.shape[:-1], -jnp.inf, jnp.float32), jnp.int32(0))
    return jax.lax.fori_loop(0, plan.n_live, q_block, init)


def _backward(cfg: _Cfg, qh, kh, vh, qm, km, plan: _Plan, lse, delta, doh):
    """(dq w.r.t. the scaled q, dk, dv) float32 in the padded head-major layouts, over the same tiles.

    ``lse`` [B, Hkv, G, Sq] normalises the probabilities (this call's own, or one merged over several K/V shards);
    ``delta`` [B, Hkv, G, Sq] is the softmax-backward row term sum_d dO * O (minus any cotangent of the lse).
    """
    _, hkv, g, sq, d = qh.shape
    bq, bk = cfg.block_q, cfg.block_k
    nq = sq // bq
    lse = jnp.where(jnp.isfinite(lse), lse, jnp.inf)  # rows that see nothing: p = exp(s - inf) = 0, zero gradients

    def q_block(i, carry):
        dq, dk, dv = carry
        t = plan.q_order[i]
        b, qi = t // nq, t % nq
        q_t, do_t = _q_rows(qh, b, qi, bq), _q_rows(doh, b, qi, bq)
        lse_t, delta_t = _q_row_stats(lse, b, qi, bq), _q_row_stats(delta, b, qi, bq)
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
                ds = ds * (1.0 - tanh_s * tanh_s)  # d/dx of c * tanh(x / c)
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
    return jax.lax.fori_loop(0, plan.n_live, q_block, init)


# ---------------------------------------------------------------------------------------- layouts and entry points


def _pad_to(x, axis, multiple):
    pad = -x.shape[axis] % multiple
    if not pad:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths)


def _q_heads(x_BSHD, hkv, block):
    """[B, Sq, Hq, D] -> [B, Hkv, G, Sq_pad, D]."""
    b, sq, hq, d = x_BSHD.shape
    return _pad_to(jnp.transpose(x_BSHD.reshape(b, sq, hkv, hq // hkv, d), (0, 2, 3, 1, 4)), 3, block)


def _from_q_heads(x_BHGSD, sq):
    """[B, Hkv, G, Sq_pad, D] -> [B, Sq, Hkv * G, D]."""
    b, hkv, g, _, d = x_BHGSD.shape
    return jnp.transpose(x_BHGSD[:, :, :, :sq], (0, 3, 1, 2, 4)).reshape(b, sq, hkv * g, d)


def _prepare(cfg: _Cfg, q, k, v, q_meta, k_meta):
    """Head-major, padded to whole blocks (padding tokens have segment 0), q scaled; and the tile plan."""
    hkv = k.shape[2]
    qm = TokenMeta(*(_pad_to(jnp.asarray(a, jnp.int32), 1, cfg.block_q) for a in q_meta))
    km = TokenMeta(*(_pad_to(jnp.asarray(a, jnp.int32), 1, cfg.block_k) for a in k_meta))
    qh = _q_heads(q * jnp.asarray(cfg.scale, q.dtype), hkv, cfg.block_q)
    kh, vh = (_pad_to(jnp.swapaxes(x, 1, 2), 2, cfg.block_k) for x in (k, v))
    return qh, kh, vh, qm, km, tile_plan(cfg, qm, km)


def _rows_from_public(x_BHS, cfg: _Cfg, hkv):
    """A row statistic [B, Hq, Sq] -> the padded head-major [B, Hkv, G, Sq_pad]."""
    b, hq, _ = x_BHS.shape
    return _pad_to(jnp.asarray(x_BHS, jnp.float32).reshape(b, hkv, hq // hkv, -1), 3, cfg.block_q)


def _fwd_block(cfg: _Cfg, q, k, v, q_meta, k_meta):
    """(out [B, Sq, Hq, D] float32, lse [B, Hq, Sq], tiles computed)."""
    b, sq, hq, _ = q.shape
    qh, kh, vh, qm, km, plan = _prepare(cfg, q, k, v, q_meta, k_meta)
    out, lse, n_tiles = _forward(cfg, qh, kh, vh, qm, km, plan)
    return _from_q_heads(out, sq), lse.reshape(b, hq, -1)[:, :, :sq], n_tiles


def _bwd_block(cfg: _Cfg, q, k, v, q_meta, k_meta, d_out, lse_BHS, delta_BHS):
    """(dq, dk, dv) float32 in the public layouts, from the public lse and delta [B, Hq, Sq]."""
    sq, sk, hkv = q.shape[1], k.shape[1], k.shape[2]
    qh, kh, vh, qm, km, plan = _prepare(cfg, q, k, v, q_meta, k_meta)
    doh = _q_heads(d_out, hkv, cfg.block_q)
    lse, delta = _rows_from_public(lse_BHS, cfg, hkv), _rows_from_public(delta_BHS, cfg, hkv)
    dqh, dkh, dvh = _backward(cfg, qh, kh, vh, qm, km, plan, lse, delta, doh)
    unpad_k = lambda x: jnp.swapaxes(x[:, :, :sk], 1, 2)  # noqa: E731
    return _from_q_heads(dqh, sq) * cfg.scale, unpad_k(dkh), unpad_k(dvh)


def _delta(out_BSHD, d_out_BSHD):
    """sum_d dO * O per row, float32, as [B, Hq, Sq]: the row term of the softmax backward."""
    return jnp.swapaxes(jnp.sum(d_out_BSHD.astype(jnp.float32) * out_BSHD.astype(jnp.float32), axis=-1), 1, 2)


@per_config_vjp
def _make_attention_with_lse(cfg: _Cfg):
    """custom_vjp of (out, lse): the lse cotangent enters as delta - d_lse, because d lse_i / d s_ij = p_ij."""

    def fwd(q, k, v, q_meta, k_meta):
        out, lse, _ = _fwd_block(cfg, q, k, v, q_meta, k_meta)
        o = out.astype(q.dtype)
        return (o, lse), (q, k, v, q_meta, k_meta, o, lse)

    def bwd(res, cotangents):
        q, k, v, q_meta, k_meta, o, lse = res
        d_o, d_lse = cotangents
        delta = _delta(o, d_o) - d_lse.astype(jnp.float32)
        dq, dk, dv = _bwd_block(cfg, q, k, v, q_meta, k_meta, d_o, lse, delta)
        return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None

    return fwd, bwd


@per_config_vjp
def _make_attention(cfg: _Cfg):
    def fwd(q, k, v, q_meta, k_meta):
        out, lse, _ = _fwd_block(cfg, q, k, v, q_meta, k_meta)
        o = out.astype(q.dtype)
        return o, (q, k, v, q_meta, k_meta, o, lse)

    def bwd(res, d_o):
        q, k, v, q_meta, k_meta, o, lse = res
        dq, dk, dv = _bwd_block(cfg, q, k, v, q_meta, k_meta, d_o, lse, _delta(o, d_o))
        return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None

    return fwd, bwd


def _config(q, k, block_q, block_k, scale, window, softcap, span_isolated) -> _Cfg:
    for name, val in (("block_q", block_q), ("block_k", block_k), ("window", window)):
        check_positive_int(name, val)
    check_softcap(softcap)
    check_gqa(q.shape[2], k.shape[2])
    return _Cfg(**config_fields(int(block_q or default_block(q.shape[1])), int(block_k or default_block(k.shape[1])),
                                q.shape[-1], scale, window, softcap, span_isolated))


def tiled_attention(q, k, v, q_meta: TokenMeta, k_meta: TokenMeta, *, block_q=None, block_k=None, scale=None,
                    window=None, softcap=None, span_isolated=False):
    """q [B, Sq, Hq, D], k/v [B, Sk, Hkv, D] -> [B, Sq, Hq, D] under the mask rule of kernels.meta (GQA when
    Hq > Hkv). Only non-empty tiles are computed; rows that attend nothing return 0 (and zero gradients)."""
    cfg = _config(q, k, block_q, block_k, scale, window, softcap, span_isolated)
    return _make_attention(cfg)(q, k, v, TokenMeta(*q_meta), TokenMeta(*k_meta))


def tiled_attention_with_lse(q, k, v, q_meta: TokenMeta, k_meta: TokenMeta, *, block_q=None, block_k=None,
                             scale=None, window=None, softcap=None, span_isolated=False):
    """(out [B, Sq, Hq, D] in q's dtype, lse [B, Hq, Sq] float32): tiled_attention and the natural-log log-sum-exp of
    each row's (scaled, softcapped, masked) logits; lse = -inf for rows that see nothing (their out is 0).

    Differentiable in both outputs (a cotangent on the lse is exact, e.g. for merging partial attentions).
    """
    cfg = _config(q, k, block_q, block_k, scale, window, softcap, span_isolated)
    return _make_attention_with_lse(cfg)(q, k, v, TokenMeta(*q_meta), TokenMeta(*k_meta))


def tiled_attention_with_count(q, k, v, q_meta: TokenMeta, k_meta: TokenMeta, *, block_q=None, block_k=None,
                               scale=None, window=None, softcap=None, span_isolated=False):
    """(output, number of tiles the forward loop actually computed). For benchmarks; not differentiable."""
    cfg = _config(q, k, block_q, block_k, scale, window, softcap, span_isolated)
    out, _, n_tiles = _fwd_block(cfg, q, k, v, TokenMeta(*q_meta), TokenMeta(*k_meta))
    return out.astype(q.dtype), n_tiles


def tiled_attention_fwd_block(q, k, v, q_meta: TokenMeta, k_meta: TokenMeta, *, block_q=None, block_k=None,
                              scale=None, window=None, softcap=None, span_isolated=False):
    """The forward of one q shard against one K/V shard, for callers that own the vjp (ring attention).

    Returns (out [B, Sq, Hq, D] float32, normalised over this K/V shard only; lse [B, Hq, Sq] float32, -inf for rows
    that see nothing here). Not differentiable: pair it with ``tiled_attention_bwd_block``.
    """
    cfg = _config(q, k, block_q, block_k, scale, window, softcap, span_isolated)
    return _fwd_block(cfg, q, k, v, TokenMeta(*q_meta), TokenMeta(*k_meta))[:2]


def tiled_attention_bwd_block(q, k, v, q_meta: TokenMeta, k_meta: TokenMeta, d_out, lse, delta, *, block_q=None,
                              block_k=None, scale=None, window=None, softcap=None, span_isolated=False):
    """(dq [B, Sq, Hq, D], dk, dv [B, Sk, Hkv, D]), float32, of one q shard against one K/V shard.

    ``lse`` [B, Hq, Sq] is the log-sum-exp over *all* keys the rows attend (merged over every K/V shard; -inf for
    rows that see nothing), so p = exp(s - lse) are the final probabilities; ``delta`` [B, Hq, Sq] is
    sum_d(d_out * out) of the final output (minus the lse cotangent, if any). Summing the results over the K/V
    shards gives the gradients of the full attention. Only the tiles the block map marks non-empty are computed.
    """
    cfg = _config(q, k, block_q, block_k, scale, window, softcap, span_isolated)
    return _bwd_block(cfg, q, k, v, TokenMeta(*q_meta), TokenMeta(*k_meta), d_out, lse, delta)
