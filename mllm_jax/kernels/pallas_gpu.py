"""Flash attention for multimodal masks in Pallas, GPU (Triton) variant, forward and backward under jax.custom_vjp.

The mask comes from per-token metadata (kernels.meta), given separately for q and k, so any permutation of the tokens
is exact. Tile skipping is real: the block map is compacted (kernels.meta.compact) into, per q block, the list of
its non-skipped k blocks and their kinds; each program loops over exactly that list, so a skipped tile is never loaded
or computed. A full tile takes a branch without the mask; a partial tile builds its mask from the metadata.

Three kernels:
  forward   grid (nQ, B, Hq): per q block, online softmax (base 2, as jax's Pallas GPU attention) over its k list;
            writes the output and the base-2 log-sum-exp (the residual convention of the Pallas GPU ops on jax 0.11).
  dQ        grid (nQ, B, Hq): the same k lists, recomputing probabilities from the log-sum-exp.
  dK/dV     grid (nK, B, Hkv): per k block and kv head, the transposed lists (the q blocks that see it); the G query
            heads of the GQA group are summed into one f32 dK/dV in the kernel (no per-query-head copies).
Lengths that are not a multiple of the block are padded with padding tokens (segment 0); head dims are padded to a
power of two (Triton's block shapes) with zeros, which change no logit. Rows that see nothing return 0.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from mllm_jax.kernels._common import (
    check_gqa, check_positive_int, check_softcap, config_fields, config_type, per_config_vjp, traced_generation,
)
from mllm_jax.kernels.meta import FULL, TokenMeta, block_map, compact

LOG2E = math.log2(math.e)

_Cfg = config_type("_Cfg", interpret=bool, num_warps=int, num_stages=int)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


# (block_q, block_k) per GPU generation and head dim (up to 64 / 128 / 256): of the candidates 128x128, 128x64,
# 64x128, 64x64, 64x32, 32x64, 32x32 (largest tile first), the first whose forward and backward (bf16, 8 query heads
# per kv head, 2 stages) the deviceless Triton compile for that GPU accepts. It refuses a kernel over the chip's
# shared memory and names the bytes requested, e.g. H100 d=128 128x64: 296 960 of 232 448; A100 d=128 128x128:
# 198 656 of 166 912. Sweep of 2026-12-06 (docs/kernels.md); tests/test_kernels_pallas_gpu.py re-checks the H100
# d=128 entry and its refused larger neighbour.
GPU_BLOCKS = {
    "h100": {64: (128, 128), 128: (64, 128), 256: (64, 32)},
    "a100": {64: (128, 128), 128: (128, 64), 256: (32, 64)},
}
# H200 is H100's GH100 chip (same SMs, shared memory and registers per SM; more and faster HBM): H100's blocks.
GPU_BLOCKS["h200"] = GPU_BLOCKS["h100"]
_DEFAULT_GPU = "h100"


def gpu_generation() -> str:
    """The GPU generation of the device being traced for ("a100", "h100", "h200"): a compile for a target from a CPU
    host gets its target's (``_common.traced_generation``); else _DEFAULT_GPU (a CPU run, a GPU not in GPU_BLOCKS)."""
    gen = traced_generation()
    return gen if gen in GPU_BLOCKS else _DEFAULT_GPU


def default_blocks(sq: int, sk: int, head_dim: int, generation: str | None = None) -> tuple[int, int]:
    """GPU_BLOCKS for the generation and head dim; short sequences get one power-of-two tile >= 16."""
    gen = generation or gpu_generation()
    if gen not in GPU_BLOCKS:
        raise ValueError(f"generation must be one of {sorted(GPU_BLOCKS)}; got {gen!r}")
    table = GPU_BLOCKS[gen]
    bq, bk = table[next((d for d in sorted(table) if head_dim <= d), max(table))]
    return min(bq, max(16, _next_pow2(sq))), min(bk, max(16, _next_pow2(sk)))


# ----------------------------------------------------------------------------------------------------------- in-kernel


def _tile_mask(qm, km, cfg: _Cfg):
    """The mask rule of kernels.meta on one tile: qm = (pos, seg, span) [bq], km likewise [bk] -> bool [bq, bk]."""
    qpos, qseg, qspan = (a[:, None] for a in qm)
    kpos, kseg, kspan = (a[None, :] for a in km)
    same_seg = (qseg == kseg) & (qseg != 0)
    causal = kpos <= qpos
    if cfg.window is not None:
        causal = causal & (qpos - kpos < cfg.window)
    same_span = (qspan == kspan) & (qspan != 0)
    if cfg.span_isolated:
        visible = jnp.where(qspan != 0, same_span, causal | same_span)
    else:
        visible = causal | same_span
    return same_seg & visible


def _dot(a, b, *, trans_a=False, trans_b=False):
    # fp32 inputs keep full precision (no TF32), so the fp32 kernel matches the reference to 1e-4.
    return plgpu.dot(a, b, trans_a=trans_a, trans_b=trans_b, allow_tf32=a.dtype != jnp.float32)


def _tile_logits(q, k, kind, qm, km_fn, cfg: _Cfg):
    """Base-2 logits [bq, bk] (softcapped, masked unless the tile is full) and tanh(x / softcap) for the backward."""
    x = _dot(q, k, trans_b=True) * cfg.scale
    t = None
    if cfg.softcap is not None:
        t = jnp.tanh(x / cfg.softcap)
        x = cfg.softcap * t
    s = x * LOG2E

    def masked():
        return jnp.where(_tile_mask(qm, km_fn(), cfg), s, -jnp.inf)

    return jax.lax.cond(kind == FULL, lambda: s, masked), t


def _fwd_kernel(kb_ref, kind_ref, count_ref, q_ref, k_ref, v_ref, qp_ref, qs_ref, qsp_ref, kp_ref, ks_ref, ksp_ref,
                o_ref, lse_ref, *count_out, cfg: _Cfg):
    bq, bk = cfg.block_q, cfg.block_k
    q = q_ref[...]
    qm = (qp_ref[...], qs_ref[...], qsp_ref[...])

    def body(j, carry):
        acc, m_i, l_i, n = carry
        kj, kind = kb_ref[j], kind_ref[j]
        ks = pl.ds(kj * bk, bk)
        k, v = k_ref[ks, :], v_ref[ks, :]
        s, _ = _tile_logits(q, k, kind, qm, lambda: (kp_ref[ks], ks_ref[ks], ksp_ref[ks]), cfg)
        m_new = jnp.maximum(m_i, jnp.max(s, axis=1))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # rows with nothing yet: exp2(-inf - 0) = 0, not NaN
        p = jnp.exp2(s - m_safe[:, None])
        alpha = jnp.exp2(m_i - m_safe)
        l_new = alpha * l_i + jnp.sum(p, axis=1)
        acc = alpha[:, None] * acc + _dot(p.astype(v.dtype), v)
        return acc, m_new, l_new, n + 1

    init = (
        jnp.zeros((bq, q.shape[-1]), jnp.float32),
        jnp.full((bq,), -jnp.inf, jnp.float32),
        jnp.zeros((bq,), jnp.float32),
        jnp.int32(0),
    )
    acc, m_i, l_i, n = jax.lax.fori_loop(0, count_ref[0], body, init)
    seen = l_i > 0
    l_safe = jnp.where(seen, l_i, 1.0)
    o_ref[...] = jnp.where(seen[:, None], acc / l_safe[:, None], 0.0).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m_i + jnp.log2(l_safe), -jnp.inf)
    if count_out:
        count_out[0][...] = jnp.full((1,), n, jnp.int32)


def _dq_kernel(kb_ref, kind_ref, count_ref, q_ref, k_ref, v_ref, qp_ref, qs_ref, qsp_ref, kp_ref, ks_ref, ksp_ref,
               do_ref, lse_ref, delta_ref, dq_ref, *, cfg: _Cfg):
    bk = cfg.block_k
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]
    qm = (qp_ref[...], qs_ref[...], qsp_ref[...])

    def body(j, dq):
        kj, kind = kb_ref[j], kind_ref[j]
        ks = pl.ds(kj * bk, bk)
        k, v = k_ref[ks, :], v_ref[ks, :]
        s, t = _tile_logits(q, k, kind, qm, lambda: (kp_ref[ks], ks_ref[ks], ksp_ref[ks]), cfg)
        p = jnp.exp2(s - lse[:, None])
        ds = p * (_dot(do, v, trans_b=True) - delta[:, None])
        if t is not None:
            ds = ds * (1.0 - t * t)  # d/dx of softcap * tanh(x / softcap)
        return dq + _dot(ds.astype(k.dtype), k)

    dq = jax.lax.fori_loop(0, count_ref[0], body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def _dkv_kernel(qb_ref, kind_ref, count_ref, q_ref, k_ref, v_ref, qp_ref, qs_ref, qsp_ref, kp_ref, ks_ref, ksp_ref,
                do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, cfg: _Cfg, group: int):
    """One k block of one kv head: its dK/dV summed over the ``group`` query heads sharing it, in f32 registers
    (q / dO blocks hold the group's heads: [Sq, G, D]; lse / delta [G, Sq])."""
    bq = cfg.block_q
    k, v = k_ref[...], v_ref[...]
    km = (kp_ref[...], ks_ref[...], ksp_ref[...])

    def body(j, carry):
        qi, kind = qb_ref[j], kind_ref[j]
        qsl = pl.ds(qi * bq, bq)
        qm = (qp_ref[qsl], qs_ref[qsl], qsp_ref[qsl])

        def head(g, carry):  # a loop, not unrolled: one head's tiles live at a time (shared memory flat in G)
            dk, dv = carry
            q, do = q_ref[qsl, g, :], do_ref[qsl, g, :]
            lse, delta = lse_ref[g, qsl], delta_ref[g, qsl]
            s, t = _tile_logits(q, k, kind, qm, lambda: km, cfg)
            p = jnp.exp2(s - lse[:, None])
            dv = dv + _dot(p.astype(do.dtype), do, trans_a=True)
            ds = p * (_dot(do, v, trans_b=True) - delta[:, None])
            if t is not None:
                ds = ds * (1.0 - t * t)
            return dk + _dot(ds.astype(q.dtype), q, trans_a=True), dv

        return jax.lax.fori_loop(0, group, head, carry)

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = jax.lax.fori_loop(0, count_ref[0], body, (zeros, zeros))
    dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


# ------------------------------------------------------------------------------------------------------------ wrappers


class _Padded(NamedTuple):
    q: jax.Array  # [B, Sq', Hq, D']
    k: jax.Array  # [B, Sk', Hkv, D']
    v: jax.Array
    q_meta: TokenMeta  # [B, Sq']
    k_meta: TokenMeta  # [B, Sk']


def _pad_axis(x, axis, size):
    if x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths)


def _pad(cfg: _Cfg, q, k, v, q_meta, k_meta) -> _Padded:
    sq = -(-q.shape[1] // cfg.block_q) * cfg.block_q
    sk = -(-k.shape[1] // cfg.block_k) * cfg.block_k
    d = max(16, _next_pow2(q.shape[-1]))
    q = _pad_axis(_pad_axis(q, 1, sq), 3, d)
    k = _pad_axis(_pad_axis(k, 1, sk), 3, d)
    v = _pad_axis(_pad_axis(v, 1, sk), 3, d)
    qm = TokenMeta(*(_pad_axis(jnp.asarray(a, jnp.int32), 1, sq) for a in q_meta))
    km = TokenMeta(*(_pad_axis(jnp.asarray(a, jnp.int32), 1, sk) for a in k_meta))
    return _Padded(q, k, v, qm, km)


def _schedule_arrays(sched):
    """Lists padded to a power-of-two length (Triton block shapes) and the count as [.., 1]."""
    n = sched.k_blocks.shape[-1]
    width = _next_pow2(n)
    return (_pad_axis(sched.k_blocks, 2, width), _pad_axis(sched.kinds, 2, width), sched.count[..., None])


def _block_map(cfg: _Cfg, p: _Padded):
    return block_map(p.q_meta, p.k_meta, cfg.block_q, cfg.block_k, window=cfg.window,
                     span_isolated=cfg.span_isolated)


def _row_specs(block, index_map):
    """Specs for the three int32 metadata arrays [B, S]."""
    return [pl.BlockSpec((None, block), index_map)] * 3


def _call(kernel, cfg, name, grid, in_specs, out_specs, out_shape):
    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=cfg.interpret,
        name=name,
    )


def _q_major_in_specs(width, bq, sk, d, g):
    """Specs of the operands the fwd and dQ grids (nQ, B, Hq) share: the q block's k list, kinds and count, the q
    block, the whole k and v of its kv head, then the q block's and all k metadata."""
    return [
        pl.BlockSpec((None, None, width), lambda i, bi, h: (bi, i, 0)),
        pl.BlockSpec((None, None, width), lambda i, bi, h: (bi, i, 0)),
        pl.BlockSpec((None, None, 1), lambda i, bi, h: (bi, i, 0)),
        pl.BlockSpec((None, bq, None, d), lambda i, bi, h: (bi, i, h, 0)),
        pl.BlockSpec((None, sk, None, d), lambda i, bi, h: (bi, 0, h // g, 0)),
        pl.BlockSpec((None, sk, None, d), lambda i, bi, h: (bi, 0, h // g, 0)),
        *_row_specs(bq, lambda i, bi, h: (bi, i)),
        *_row_specs(sk, lambda i, bi, h: (bi, 0)),
    ]


def _forward(cfg: _Cfg, p: _Padded, with_count: bool = False, out_dtype=None):
    """out [B, Sq', Hq, D'] (``out_dtype``, default q's), lse (base 2) [B, Hq, Sq'], and with_count: tiles computed
    per program [B, Hq, nQ, 1]."""
    b, sq, hq, d = p.q.shape
    sk, hkv = p.k.shape[1], p.k.shape[2]
    bq, g = cfg.block_q, hq // hkv
    nq = sq // bq
    sched = _schedule_arrays(compact(_block_map(cfg, p)))
    in_specs = _q_major_in_specs(sched[0].shape[-1], bq, sk, d, g)
    out_specs = [
        pl.BlockSpec((None, bq, None, d), lambda i, bi, h: (bi, i, h, 0)),
        pl.BlockSpec((None, None, bq), lambda i, bi, h: (bi, h, i)),
    ]
    out_shape = [jax.ShapeDtypeStruct(p.q.shape, out_dtype or p.q.dtype),
                 jax.ShapeDtypeStruct((b, hq, sq), jnp.float32)]
    if with_count:
        out_specs.append(pl.BlockSpec((None, None, None, 1), lambda i, bi, h: (bi, h, i, 0)))
        out_shape.append(jax.ShapeDtypeStruct((b, hq, nq, 1), jnp.int32))
    return _call(functools.partial(_fwd_kernel, cfg=cfg), cfg, "multimodal_flash_fwd", (nq, b, hq), in_specs,
                 out_specs, out_shape)(*sched, p.q, p.k, p.v, *p.q_meta, *p.k_meta)


def _backward(cfg: _Cfg, p: _Padded, lse, delta, d_out, out_dtype=None):
    """dq [B, Sq', Hq, D'], dk and dv [B, Sk', Hkv, D'] (``out_dtype``, default the inputs') in the padded layout,
    given the base-2 lse and the row term delta = sum(d_out * out), both [B, Hq, Sq']."""
    b, sq, hq, d = p.q.shape
    sk, hkv = p.k.shape[1], p.k.shape[2]
    bq, bk, g = cfg.block_q, cfg.block_k, hq // hkv
    bm = _block_map(cfg, p)
    # Rows that saw nothing have lse = -inf; +inf makes exp2(s - lse) = 0 there (their gradients are exactly 0).
    lse = jnp.where(lse == -jnp.inf, jnp.inf, lse)
    operands = (p.q, p.k, p.v, *p.q_meta, *p.k_meta, d_out, lse, delta)

    by_q = _schedule_arrays(compact(bm))
    w = by_q[0].shape[-1]
    dq = _call(
        functools.partial(_dq_kernel, cfg=cfg), cfg, "multimodal_flash_dq", (sq // bq, b, hq),
        [
            *_q_major_in_specs(w, bq, sk, d, g),
            pl.BlockSpec((None, bq, None, d), lambda i, bi, h: (bi, i, h, 0)),
            pl.BlockSpec((None, None, bq), lambda i, bi, h: (bi, h, i)),
            pl.BlockSpec((None, None, bq), lambda i, bi, h: (bi, h, i)),
        ],
        pl.BlockSpec((None, bq, None, d), lambda i, bi, h: (bi, i, h, 0)),
        jax.ShapeDtypeStruct(p.q.shape, out_dtype or p.q.dtype),
    )(*by_q, *operands)

    by_k = _schedule_arrays(compact(jnp.swapaxes(bm, 1, 2)))
    w = by_k[0].shape[-1]
    # Grid over kv heads: each program sums its group's G query heads into one f32 dK/dV (no per-query-head copies).
    dk, dv = _call(
        functools.partial(_dkv_kernel, cfg=cfg, group=g), cfg, "multimodal_flash_dkv", (sk // bk, b, hkv),
        [
            pl.BlockSpec((None, None, w), lambda j, bi, h: (bi, j, 0)),
            pl.BlockSpec((None, None, w), lambda j, bi, h: (bi, j, 0)),
            pl.BlockSpec((None, None, 1), lambda j, bi, h: (bi, j, 0)),
            pl.BlockSpec((None, sq, g, d), lambda j, bi, h: (bi, 0, h, 0)),
            pl.BlockSpec((None, bk, None, d), lambda j, bi, h: (bi, j, h, 0)),
            pl.BlockSpec((None, bk, None, d), lambda j, bi, h: (bi, j, h, 0)),
            *_row_specs(sq, lambda j, bi, h: (bi, 0)),
            *_row_specs(bk, lambda j, bi, h: (bi, j)),
            pl.BlockSpec((None, sq, g, d), lambda j, bi, h: (bi, 0, h, 0)),
            pl.BlockSpec((None, g, sq), lambda j, bi, h: (bi, h, 0)),
            pl.BlockSpec((None, g, sq), lambda j, bi, h: (bi, h, 0)),
        ],
        [pl.BlockSpec((None, bk, None, d), lambda j, bi, h: (bi, j, h, 0))] * 2,
        [jax.ShapeDtypeStruct(p.k.shape, out_dtype or p.k.dtype),
         jax.ShapeDtypeStruct(p.v.shape, out_dtype or p.v.dtype)],
    )(*by_k, *operands)
    return dq, dk, dv


@per_config_vjp
def _make_attention(cfg: _Cfg):
    """The custom_vjp rules (fwd, bwd) for one static configuration."""

    def fwd(q, k, v, q_meta, k_meta):
        p = _pad(cfg, q, k, v, q_meta, k_meta)
        out, lse = _forward(cfg, p)
        o = out[:, : q.shape[1], :, : q.shape[3]]
        return o, (q, k, v, q_meta, k_meta, out, lse)

    def bwd(res, d_o):
        q, k, v, q_meta, k_meta, out, lse = res
        p = _pad(cfg, q, k, v, q_meta, k_meta)
        d_out = _pad_axis(_pad_axis(d_o, 1, out.shape[1]), 3, out.shape[3])
        delta = jnp.einsum("bqhd,bqhd->bhq", out.astype(jnp.float32), d_out.astype(jnp.float32))
        dq, dk, dv = _backward(cfg, p, lse, delta, d_out)
        sq, sk, d = q.shape[1], k.shape[1], q.shape[3]
        return (dq[:, :sq, :, :d], dk[:, :sk, :, :d], dv[:, :sk, :, :d],
                None, None)

    return fwd, bwd


def _config(q, k, v, block_q, block_k, scale, window, softcap, span_isolated, interpret) -> _Cfg:
    if q.ndim != 4 or k.shape != v.shape or k.ndim != 4:
        raise ValueError(f"q must be [B, Sq, Hq, D] and k, v [B, Sk, Hkv, D]; got {q.shape}, {k.shape}, {v.shape}")
    check_gqa(q.shape[2], k.shape[2])
    d = q.shape[-1]
    dbq, dbk = default_blocks(q.shape[1], k.shape[1], d)
    block_q, block_k = block_q or dbq, block_k or dbk
    for name, val in (("block_q", block_q), ("block_k", block_k)):
        if int(val) != val or val < 16 or val & (val - 1):
            raise ValueError(f"{name} must be a power of two >= 16 (Triton tiles); got {val!r}")
    check_positive_int("window", window)
    check_softcap(softcap)
    return _Cfg(
        **config_fields(int(block_q), int(block_k), d, scale, window, softcap, span_isolated),
        interpret=bool(interpret), num_warps=4 if d <= 64 else 8, num_stages=2,
    )


def flash_attention(
    q, k, v, q_meta: TokenMeta, k_meta: TokenMeta, *, block_q=None, block_k=None, scale=None, window=None,
    softcap=None, span_isolated=False, interpret=False,
):
    """q [B, Sq, Hq, D], k/v [B, Sk, Hkv, D] -> [B, Sq, Hq, D] under the mask rule of kernels.meta; GQA; fp32/bf16.

    Differentiable (custom_vjp with Pallas dQ and dK/dV kernels). ``interpret=True`` runs the kernels on CPU.
    """
    cfg = _config(q, k, v, block_q, block_k, scale, window, softcap, span_isolated, interpret)
    return _make_attention(cfg)(q, k, v, TokenMeta(*q_meta), TokenMeta(*k_meta))


def flash_attention_with_count(
    q, k, v, q_meta: TokenMeta, k_meta: TokenMeta, *, block_q=None, block_k=None, scale=None, window=None,
    softcap=None, span_isolated=False, interpret=False,
):
    """(output, tiles computed per query head) where the count is incremented inside the kernel's tile loop."""
    cfg = _config(q, k, v, block_q, block_k, scale, window, softcap, span_isolated, interpret)
    out, _, n = _forward(cfg, _pad(cfg, q, k, v, TokenMeta(*q_meta), TokenMeta(*k_meta)), with_count=True)
    return out[:, : q.shape[1], :, : q.shape[3]], n.sum(axis=(2, 3))  # [B, Hq]


def flash_attention_fwd_block(
    q, k, v, q_meta: TokenMeta, k_meta: TokenMeta, *, block_q=None, block_k=None, scale=None, window=None,
    softcap=None, span_isolated=False, interpret=False, with_count=False,
):
    """The forward of one q shard against one K/V shard, for callers that own the vjp (ring attention); the
    conventions of kernels.tiled.tiled_attention_fwd_block: (out [B, Sq, Hq, D] float32, normalised over this K/V
    shard only; lse [B, Hq, Sq] float32, natural log, -inf for rows that see nothing here). The kernel's compacted
    tile lists skip the empty tiles of the pair. ``with_count``: also the tiles the kernel's loops computed per
    batch row and query head, int32 [B, Hq] (counted inside the loop, as flash_attention_with_count)."""
    cfg = _config(q, k, v, block_q, block_k, scale, window, softcap, span_isolated, interpret)
    out, lse2, *n = _forward(cfg, _pad(cfg, q, k, v, TokenMeta(*q_meta), TokenMeta(*k_meta)), with_count=with_count,
                             out_dtype=jnp.float32)
    result = out[:, : q.shape[1], :, : q.shape[3]], lse2[:, :, : q.shape[1]] / LOG2E  # -inf stays -inf
    return (*result, n[0].sum(axis=(2, 3))) if with_count else result


def flash_attention_bwd_block(
    q, k, v, q_meta: TokenMeta, k_meta: TokenMeta, d_out, lse, delta, *, block_q=None, block_k=None, scale=None,
    window=None, softcap=None, span_isolated=False, interpret=False,
):
    """(dq [B, Sq, Hq, D], dk, dv [B, Sk, Hkv, D]) float32 of one q shard against one K/V shard, given the lse
    merged over every K/V shard ([B, Hq, Sq], natural log, -inf where nothing is seen) and delta = sum(d_out * out)
    [B, Hq, Sq]: the conventions of kernels.tiled.tiled_attention_bwd_block."""
    cfg = _config(q, k, v, block_q, block_k, scale, window, softcap, span_isolated, interpret)
    p = _pad(cfg, q, k, v, TokenMeta(*q_meta), TokenMeta(*k_meta))
    sq_pad, d_pad = p.q.shape[1], p.q.shape[3]
    rows = lambda x: _pad_axis(jnp.asarray(x, jnp.float32), 2, sq_pad)  # noqa: E731 padded rows: lse 0, delta 0
    d_o = _pad_axis(_pad_axis(d_out.astype(q.dtype), 1, sq_pad), 3, d_pad)  # the kernels' dots take one dtype
    dq, dk, dv = _backward(cfg, p, rows(lse) * LOG2E, rows(delta), d_o, out_dtype=jnp.float32)
    sq, sk, d = q.shape[1], k.shape[1], q.shape[3]
    return dq[:, :sq, :, :d], dk[:, :sk, :, :d], dv[:, :sk, :, :d]
