"""Blockwise (flash-style) attention in pure JAX for CPU and long sequences: online softmax over tiles, only the tiles
the block map marks non-empty are ever computed, and no [Sq, Sk] array is materialised.

How tiles are skipped (really skipped, not masked): the block map [B, nQ, nK] is compacted per q block into a list of
its non-skipped k blocks (`TileSchedule`). A sequential loop over the B * nQ q blocks runs, for each, a
`lax.fori_loop` whose trip count is that q block's count: the k blocks not in the list are never touched. Nothing here
is vmapped over the tile loop (under vmap a data-dependent loop or cond would compute every tile). Full tiles skip the
mask through a `lax.cond` on the tile kind, which stays real control flow outside vmap.

The backward (custom_vjp) walks the same schedule: per tile it recomputes the probabilities from the saved
log-sum-exp and accumulates dQ for the q block and dK/dV into whole-sequence accumulators (updated in place).

For attention split over K/V shards (ring context parallelism) the log-sum-exp is public: `blockwise_attention_with_lse`
(differentiable in out and lse) and the pair `blockwise_attention_fwd_block` / `blockwise_attention_bwd_block`, whose
backward takes the lse and row term merged over all shards so the caller's own vjp can sum per-shard gradients.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from mllm_jax.kernels._common import DEFAULT_BLOCK  # noqa: F401  (public here, as before)
from mllm_jax.kernels._common import (check_gqa, check_positive_int, check_softcap, config_fields, config_type, default_block,
                             per_config_vjp)
from mllm_jax.kernels.meta import FULL, SKIP, TokenMeta, block_map, mask as mask_rule


class TileSchedule(NamedTuple):
    """Per q block, its non-skipped k blocks first (in increasing order), their kinds, and how many there are."""

    k_blocks: jax.Array  # int32 [B, nQ, nK]; entries past `count` are never read
    kinds: jax.Array  # int32 [B, nQ, nK]; PARTIAL or FULL for the first `count` entries
    count: jax.Array  # int32 [B, nQ]


def compact(bm) -> TileSchedule:
    """Per row of a block map [B, nRows, nCols], its non-skipped columns first (in increasing order) and their count.

    Applied to the block map it gives each q block's k blocks; applied to its transpose, each k block's q blocks.
    """
    # A stable sort on "is skipped" moves the computed blocks to the front and keeps them in increasing order.
    order = jnp.argsort(bm == SKIP, axis=-1, stable=True).astype(jnp.int32)
    kinds = jnp.take_along_axis(bm, order, axis=-1)
    return TileSchedule(order, kinds, jnp.sum(bm != SKIP, axis=-1).astype(jnp.int32))


def tile_schedule(q_meta, k_meta, block_q, block_k, *, window=None, span_isolated=False) -> TileSchedule:
    """Compacted per-q-block lists of the k blocks to compute, from the jnp block map (same on host and device)."""
    bm = block_map(
        TokenMeta(*map(jnp.asarray, q_meta)), TokenMeta(*map(jnp.asarray, k_meta)), block_q, block_k,
        window=window, span_isolated=span_isolated,
    )
    return compact(bm)


def _pad_seq(x, multiple):
    pad = -x.shape[1] % multiple
    if not pad:
        return x
    return jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))


_Cfg = config_type("_Cfg")


def _tile_logits(cfg: _Cfg, q_tile, k_tile, qm_tile, km_tile, kind):
    """Masked (softcapped) logits [Hkv, G, bq, bk] of one tile, and the pre-cap tanh for the softcap derivative.

    q_tile [bq, Hkv, G, D], k_tile [bk, Hkv, D]; qm/km: TokenMeta of [1, bq] / [1, bk]. Full tiles skip the mask.
    """
    x = jnp.einsum("qhgd,khd->hgqk", q_tile, k_tile, preferred_element_type=jnp.float32) * cfg.scale
    t = None
    if cfg.softcap is not None:
        t = jnp.tanh(x / cfg.softcap)
        x = cfg.softcap * t

    def masked():
        m = mask_rule(qm_tile, km_tile, window=cfg.window, span_isolated=cfg.span_isolated)[0]
        return jnp.where(m, x, -jnp.inf)

    return jax.lax.cond(kind == FULL, lambda: x, masked), t


def _slice_meta(meta: TokenMeta, b, start, size):
    return TokenMeta(*(jax.lax.dynamic_slice(a, (b, start), (1, size)) for a in meta))


def _forward(cfg: _Cfg, q, k, v, q_meta, k_meta):
    """q [B, Sq, Hkv, G, D] and k, v [B, Sk, Hkv, D], padded to whole blocks; metadata padded likewise.

    Returns out [B, Sq, Hkv, G, D] (f32), lse [B, Sq, Hkv, G] (-inf where a row sees nothing) and the number of tiles
    actually computed (counted inside the loop body, for the benchmarks).
    """
    b_, sq, hkv, g, d = q.shape
    bq, bk = cfg.block_q, cfg.block_k
    nq = sq // bq
    sched = tile_schedule(q_meta, k_meta, bq, bk, window=cfg.window, span_isolated=cfg.span_isolated)

    def q_block(t, carry):
        out, lse, n_tiles = carry
        b, qi = t // nq, t % nq
        q_tile = jax.lax.dynamic_slice(q, (b, qi * bq, 0, 0, 0), (1, bq, hkv, g, d))[0]
        qm = _slice_meta(q_meta, b, qi * bq, bq)

        def k_tile(j, c):
            m_i, l_i, acc, n = c
            kj, kind = sched.k_blocks[b, qi, j], sched.kinds[b, qi, j]
            k_t = jax.lax.dynamic_slice(k, (b, kj * bk, 0, 0), (1, bk, hkv, d))[0]
            v_t = jax.lax.dynamic_slice(v, (b, kj * bk, 0, 0), (1, bk, hkv, d))[0]
            s, _ = _tile_logits(cfg, q_tile, k_t, qm, _slice_meta(k_meta, b, kj * bk, bk), kind)
            m_new = jnp.maximum(m_i, s.max(-1))
            m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)  # rows with nothing yet: exp(-inf - 0) = 0
            p = jnp.exp(s - m_safe[..., None])
            alpha = jnp.exp(m_i - m_safe)
            l_new = alpha * l_i + p.sum(-1)
            pv = jnp.einsum("hgqk,khd->hgqd", p.astype(v.dtype), v_t, preferred_element_type=jnp.float32)
            return m_new, l_new, alpha[..., None] * acc + pv, n + 1

        init = (
            jnp.full((hkv, g, bq), -jnp.inf, jnp.float32),
            jnp.zeros((hkv, g, bq), jnp.float32),
            jnp.zeros((hkv, g, bq, d), jnp.float32),
            jnp.int32(0),
        )
        m_i, l_i, acc, n = jax.lax.fori_loop(0, sched.count[b, qi], k_tile, init)
        seen = l_i > 0
        o = jnp.where(seen[..., None], acc / jnp.where(seen, l_i, 1.0)[..., None], 0.0)
        row_lse = jnp.where(seen, m_i + jnp.log(jnp.where(seen, l_i, 1.0)), -jnp.inf)
        out = jax.lax.dynamic_update_slice(out, jnp.transpose(o, (2, 0, 1, 3))[None], (b, qi * bq, 0, 0, 0))
        lse = jax.lax.dynamic_update_slice(lse, jnp.transpose(row_lse, (2, 0, 1))[None], (b, qi * bq, 0, 0))
        return out, lse, n_tiles + n

    init = (jnp.zeros(q.shape, jnp.float32), jnp.zeros(q.shape[:-1], jnp.float32), jnp.int32(0))
    return jax.lax.fori_loop(0, b_ * nq, q_block, init)


def _backward(cfg: _Cfg, q, k, v, q_meta, k_meta, lse, delta, d_out):
    """Gradients (dq, dk, dv) in the padded layouts of `_forward`, over the same tile schedule.

    ``lse`` [B, Sq, Hkv, G] is the log-sum-exp the probabilities are normalised by (this call's own, or a larger
    one merged over several K/V shards); ``delta`` [B, Sq, Hkv, G] is the softmax-backward row term
    sum_d dO * O (minus any cotangent of the lse, since d lse / d s = p).
    """
    b_, sq, hkv, g, d = q.shape
    bq, bk = cfg.block_q, cfg.block_k
    nq = sq // bq
    sched = tile_schedule(q_meta, k_meta, bq, bk, window=cfg.window, span_isolated=cfg.span_isolated)
    # Rows that saw nothing have lse = -inf; +inf makes exp(s - lse) = 0 there, so their gradients are exactly 0.
    lse = jnp.where(jnp.isfinite(lse), lse, jnp.inf)

    def q_block(t, carry):
        dq, dk, dv = carry
        b, qi = t // nq, t % nq

        def rows(a, extra):
            return jax.lax.dynamic_slice(a, (b, qi * bq) + (0,) * extra, (1, bq) + a.shape[2:])[0]

        q_tile, do_tile = rows(q, 3), rows(d_out, 3)  # [bq, Hkv, G, D]
        lse_t = jnp.transpose(rows(lse, 2), (1, 2, 0))  # [Hkv, G, bq]
        delta_t = jnp.transpose(rows(delta, 2), (1, 2, 0))
        qm = _slice_meta(q_meta, b, qi * bq, bq)

        def k_tile(j, c):
            dq_t, dk, dv = c
            kj, kind = sched.k_blocks[b, qi, j], sched.kinds[b, qi, j]
            k_t = jax.lax.dynamic_slice(k, (b, kj * bk, 0, 0), (1, bk, hkv, d))[0]
            v_t = jax.lax.dynamic_slice(v, (b, kj * bk, 0, 0), (1, bk, hkv, d))[0]
            s, tanh_x = _tile_logits(cfg, q_tile, k_t, qm, _slice_meta(k_meta, b, kj * bk, bk), kind)
            p = jnp.exp(s - lse_t[..., None])  # [Hkv, G, bq, bk]
            dv_t = jnp.einsum("hgqk,qhgd->khd", p.astype(d_out.dtype), do_tile, preferred_element_type=jnp.float32)
            dp = jnp.einsum("qhgd,khd->hgqk", do_tile, v_t, preferred_element_type=jnp.float32)
            ds = p * (dp - delta_t[..., None])
            if cfg.softcap is not None:
                ds = ds * (1.0 - tanh_x * tanh_x)  # d/dx of c * tanh(x / c)
            ds = ds * cfg.scale
            dq_t = dq_t + jnp.einsum("hgqk,khd->qhgd", ds.astype(k.dtype), k_t, preferred_element_type=jnp.float32)
            dk_t = jnp.einsum("hgqk,qhgd->khd", ds.astype(q.dtype), q_tile, preferred_element_type=jnp.float32)
            at = (b, kj * bk, 0, 0)
            dk = jax.lax.dynamic_update_slice(dk, jax.lax.dynamic_slice(dk, at, (1, bk, hkv, d)) + dk_t[None], at)
            dv = jax.lax.dynamic_update_slice(dv, jax.lax.dynamic_slice(dv, at, (1, bk, hkv, d)) + dv_t[None], at)
            return dq_t, dk, dv

        dq_t, dk, dv = jax.lax.fori_loop(
            0, sched.count[b, qi], k_tile, (jnp.zeros((bq, hkv, g, d), jnp.float32), dk, dv)
        )
        dq = jax.lax.dynamic_update_slice(dq, dq_t[None], (b, qi * bq, 0, 0, 0))
        return dq, dk, dv

    init = (jnp.zeros(q.shape, jnp.float32), jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    return jax.lax.fori_loop(0, b_ * nq, q_block, init)


def _prepare(cfg: _Cfg, q, k, v, q_meta, k_meta):
    """Pad to whole blocks (padding tokens have segment 0) and split q heads into [Hkv, G]."""
    b, sq, hq, d = q.shape
    hkv = k.shape[2]
    qp = _pad_seq(q, cfg.block_q).reshape(b, -1, hkv, hq // hkv, d)
    qm = TokenMeta(*(_pad_seq(jnp.asarray(a, jnp.int32), cfg.block_q) for a in q_meta))
    km = TokenMeta(*(_pad_seq(jnp.asarray(a, jnp.int32), cfg.block_k) for a in k_meta))
    return qp, _pad_seq(k, cfg.block_k), _pad_seq(v, cfg.block_k), qm, km


def _delta(out, d_out):
    """sum_d dO * O per row, in f32: the row term of the softmax backward."""
    return jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)


@per_config_vjp
def _make_attention(cfg: _Cfg):
    """The custom_vjp rules (fwd, bwd) for one static configuration."""

    def fwd(q, k, v, q_meta, k_meta):
        b, sq, hq, d = q.shape
        qp, kp, vp, qm, km = _prepare(cfg, q, k, v, q_meta, k_meta)
        out, lse, _ = _forward(cfg, qp, kp, vp, qm, km)
        o = out.reshape(b, -1, hq, d)[:, :sq].astype(q.dtype)
        return o, (q, k, v, q_meta, k_meta, o, lse)

    def bwd(res, d_o):
        q, k, v, q_meta, k_meta, o, lse = res
        b, sq, hq, d = q.shape
        sk, hkv = k.shape[1], k.shape[2]
        qp, kp, vp, qm, km = _prepare(cfg, q, k, v, q_meta, k_meta)
        op = _pad_seq(o, cfg.block_q).reshape(qp.shape)
        dop = _pad_seq(d_o, cfg.block_q).reshape(qp.shape)
        dq, dk, dv = _backward(cfg, qp, kp, vp, qm, km, lse, _delta(op, dop), dop)
        dq = dq.reshape(b, -1, hq, d)[:, :sq].astype(q.dtype)
        return dq, dk[:, :sk].astype(k.dtype), dv[:, :sk].astype(v.dtype), None, None

    return fwd, bwd


def _config(q, k, block_q, block_k, scale, window, softcap, span_isolated) -> _Cfg:
    for name, val in (("block_q", block_q), ("block_k", block_k), ("window", window)):
        check_positive_int(name, val)
    check_softcap(softcap)
    check_gqa(q.shape[2], k.shape[2])
    return _Cfg(**config_fields(int(block_q or default_block(q.shape[1])), int(block_k or default_block(k.shape[1])),
                                q.shape[-1], scale, window, softcap, span_isolated))


def blockwise_attention(
    q, k, v, q_meta: TokenMeta, k_meta: TokenMeta, *, block_q=None, block_k=None, scale=None, window=None,
    softcap=None, span_isolated=False,
):
    """q [B, Sq, Hq, D], k/v [B, Sk, Hkv, D] -> [B, Sq, Hq, D], the mask rule of kernels.meta, GQA when Hq > Hkv.

    Rows that attend nothing return 0 (and 0 gradients). Differentiable by a custom_vjp that walks the same tiles.
    """
    cfg = _config(q, k, block_q, block_k, scale, window, softcap, span_isolated)
    return _make_attention(cfg)(q, k, v, TokenMeta(*q_meta), TokenMeta(*k_meta))


def blockwise_attention_with_count(
    q, k, v, q_meta: TokenMeta, k_meta: TokenMeta, *, block_q=None, block_k=None, scale=None, window=None,
    softcap=None, span_isolated=False,
):
    """(output, number of tiles the forward loop actually computed). For benchmarks; not differentiable."""
    cfg = _config(q, k, block_q, block_k, scale, window, softcap, span_isolated)
    b, sq, hq, d = q.shape
    qp, kp, vp, qm, km = _prepare(cfg, q, k, v, q_meta, k_meta)
    out, _, n = _forward(cfg, qp, kp, vp, qm, km)
    return out.reshape(b, -1, hq, d)[:, :sq].astype(q.dtype), n


# ------------------------------------------------------------------------------------------ log-sum-exp interface
# The lse is public as [B, Hq, Sq] float32 (the layout of flash-attention kernels); -inf marks a row that sees nothing.


def _lse_to_public(lse_BSHG, sq):
    b, _, hkv, g = lse_BSHG.shape
    return jnp.transpose(lse_BSHG.reshape(b, -1, hkv * g), (0, 2, 1))[:, :, :sq]


def _rows_from_public(x_BHS, cfg: _Cfg, hkv):
    """[B, Hq, Sq] -> the padded internal row layout [B, Sq_pad, Hkv, G]."""
    b, hq, _ = x_BHS.shape
    x = _pad_seq(jnp.transpose(jnp.asarray(x_BHS, jnp.float32), (0, 2, 1)), cfg.block_q)
    return x.reshape(b, -1, hkv, hq // hkv)


def _fwd_block(cfg: _Cfg, q, k, v, q_meta, k_meta):
    b, sq, hq, d = q.shape
    qp, kp, vp, qm, km = _prepare(cfg, q, k, v, q_meta, k_meta)
    out, lse, _ = _forward(cfg, qp, kp, vp, qm, km)
    return out.reshape(b, -1, hq, d)[:, :sq], _lse_to_public(lse, sq)


def _bwd_block(cfg: _Cfg, q, k, v, q_meta, k_meta, d_out, lse_BHS, delta_BHS):
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    qp, kp, vp, qm, km = _prepare(cfg, q, k, v, q_meta, k_meta)
    dop = _pad_seq(d_out, cfg.block_q).reshape(qp.shape)
    lse, delta = _rows_from_public(lse_BHS, cfg, hkv), _rows_from_public(delta_BHS, cfg, hkv)
    dq, dk, dv = _backward(cfg, qp, kp, vp, qm, km, lse, delta, dop)
    return dq.reshape(b, -1, hq, d)[:, :sq], dk[:, :sk], dv[:, :sk]


@per_config_vjp
def _make_attention_with_lse(cfg: _Cfg):
    """custom_vjp of (out, lse): the lse cotangent enters as delta - d_lse, because d lse_i / d s_ij = p_ij."""

    def fwd(q, k, v, q_meta, k_meta):
        out, lse = _fwd_block(cfg, q, k, v, q_meta, k_meta)
        o = out.astype(q.dtype)
        return (o, lse), (q, k, v, q_meta, k_meta, o, lse)

    def bwd(res, cotangents):
        q, k, v, q_meta, k_meta, o, lse = res
        d_o, d_lse = cotangents
        delta = jnp.transpose(_delta(o, d_o), (0, 2, 1)) - d_lse.astype(jnp.float32)  # [B, Hq, Sq]
        dq, dk, dv = _bwd_block(cfg, q, k, v, q_meta, k_meta, d_o, lse, delta)
        return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None

    return fwd, bwd


def blockwise_attention_with_lse(
    q, k, v, q_meta: TokenMeta, k_meta: TokenMeta, *, block_q=None, block_k=None, scale=None, window=None,
    softcap=None, span_isolated=False,
):
    """(out [B, Sq, Hq, D] in q's dtype, lse [B, Hq, Sq] float32): blockwise_attention and the natural-log
    log-sum-exp of each row's (scaled, softcapped, masked) logits; lse = -inf for rows that see nothing (their out is 0).

    Differentiable in both outputs (a cotangent on the lse is exact, e.g. for merging partial attentions).
    """
    cfg = _config(q, k, block_q, block_k, scale, window, softcap, span_isolated)
    return _make_attention_with_lse(cfg)(q, k, v, TokenMeta(*q_meta), TokenMeta(*k_meta))


def blockwise_attention_fwd_block(
    q, k, v, q_meta: TokenMeta, k_meta: TokenMeta, *, block_q=None, block_k=None, scale=None, window=None,
    softcap=None, span_isolated=False,
):
    """The forward of one q shard against one K/V shard, for callers that own the vjp (ring attention).

    Returns (out [B, Sq, Hq, D] float32, normalised over this K/V shard only; lse [B, Hq, Sq] float32, -inf for rows
    that see nothing here). Not differentiable: pair it with ``blockwise_attention_bwd_block``.
    """
    cfg = _config(q, k, block_q, block_k, scale, window, softcap, span_isolated)
    return _fwd_block(cfg, q, k, v, TokenMeta(*q_meta), TokenMeta(*k_meta))


def blockwise_attention_bwd_block(
    q, k, v, q_meta: TokenMeta, k_meta: TokenMeta, d_out, lse, delta, *, block_q=None, block_k=None, scale=None,
    window=None, softcap=None, span_isolated=False,
):
    """(dq [B, Sq, Hq, D], dk, dv [B, Sk, Hkv, D]), float32, of one q shard against one K/V shard.

    ``lse`` [B, Hq, Sq] is the log-sum-exp over *all* keys the rows attend (merged over every K/V shard; -inf for
    rows that see nothing), so p = exp(s - lse) are the final probabilities; ``delta`` [B, Hq, Sq] is
    sum_d(d_out * out) of the final output (minus the lse cotangent, if any). Summing the results over the K/V
    shards gives the gradients of the full attention. Only the tiles the block map marks non-empty are computed.
    """
    cfg = _config(q, k, block_q, block_k, scale, window, softcap, span_isolated)
    return _bwd_block(cfg, q, k, v, TokenMeta(*q_meta), TokenMeta(*k_meta), d_out, lse, delta)
