"""Flash attention for TPU in Pallas (Mosaic), block-sparse over the multimodal mask (docs/architecture.md, 'Token
metadata and the attention rule').

Layout. The wrapper pads the sequences to whole blocks (padding tokens have segment 0, so they see nothing and nothing
sees them) and moves heads in front: q [B, Hq, Sq, D], k/v [B, Hkv, Sk, D], so every VMEM block is a (rows, D) tile.
Token metadata travels as int32 arrays shaped for Mosaic's (8, 128) tiling: the q side broadcast across lanes
[B, 3, Sq, 128] (a column per q token), the k side as rows [B, 3, Sk] (a row per field), the same layouts splash
attention uses for segment ids. Fields are (position, segment, span).

Sparsity. ``kernels.meta.block_map`` (jnp, on device) classifies every (q block, kv block) tile as skip / partial /
full. It is compacted per q block into the ascending list of non-skipped kv blocks plus a count, and handed to the
kernel by scalar prefetch (SMEM). The kv-block grid axis walks that list: the k/v index_map reads the list, and past the
count the list repeats its last entry, so Pallas sees an unchanged block index and issues no DMA, and the body is
disabled by ``pl.when``. Skipped tiles are therefore neither fetched nor computed; full tiles are computed without any
mask; partial tiles evaluate the mask rule from the q and k metadata taken separately, so any permutation of the tokens
(context parallelism) is exact. The dK/dV kernel walks the transposed list (per kv block, the q blocks that see it).

Numerics. Logits and softmax statistics are f32. Masked logits take a finite ``_MASK_VALUE`` and masked
probabilities are forced to exactly 0, so rows that see nothing keep l = 0 and return 0 (and zero gradients), never
NaN. The forward saves the log-sum-exp per row for the backward kernels (dQ, and dK/dV with the GQA group summed in
the kernel).
"""

from __future__ import annotations

import contextlib
import math
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from mllm_jax.kernels._common import check_gqa, config_fields, config_type
from mllm_jax.kernels.meta import FULL, PARTIAL, TokenMeta, block_map, compact

_LANES = 128
_DEFAULT_BLOCK = 128
# Finite, so a row with nothing visible yet computes exp(MASK - MASK) = 1 instead of exp(-inf + inf) = NaN; its
# probabilities are then zeroed explicitly.
_MASK_VALUE = -1e30
# Log-sum-exp stored for a row that sees nothing: exp(logit - _EMPTY_LSE) underflows to exactly 0 in the backward.
_EMPTY_LSE = 1e30
_NT_DIMS = (((1,), (1,)), ((), ()))  # a @ b.T


# Static kernel parameters (hashable: a nondiff argument of the custom_vjp); group: query heads per kv head.
_Config = config_type("_Config", group=int, interpret=bool)


# ----------------------------------------------------------------------------------------------------------------------
# In-kernel helpers
# ----------------------------------------------------------------------------------------------------------------------


def _lanes_to(x_R128, width):
    """Widen a lane-replicated [rows, 128] value to [rows, width] (tile, then trim for widths not a multiple of 128)."""
    reps = -(-width // _LANES)
    x = jnp.tile(x_R128, (1, reps)) if reps > 1 else x_R128
    return x if x.shape[1] == width else x[:, :width]


def _rows_to_lanes(x_R, rows):
    return lax.broadcast_in_dim(x_R, (rows, _LANES), (0,))


def _visible(qmeta_ref, kmeta_ref, cfg: _Config):
    """The mask rule of kernels.meta on one tile: bool [block_q, block_k]."""
    width = cfg.block_k
    pos_q, seg_q, span_q = (_lanes_to(qmeta_ref[f], width) for f in range(3))  # [bq, bk]
    pos_k, seg_k, span_k = (kmeta_ref[f : f + 1, :] for f in range(3))  # [1, bk]
    same_seg = (seg_q == seg_k) & (seg_q != 0)
    causal = pos_k <= pos_q
    if cfg.window is not None:
        causal = causal & (pos_q - pos_k < cfg.window)
    same_span = (span_q == span_k) & (span_q != 0)
    if cfg.span_isolated:
        visible = same_span | ((span_q == 0) & causal)  # span tokens see only their own span
    else:
        visible = same_span | causal
    return same_seg & visible


def _logits(q, k, cfg: _Config):
    """Scaled (and soft-capped) logits f32 [bq, bk]; also tanh(s / cap) for the backward, or None."""
    s = lax.dot_general(q, k, _NT_DIMS, preferred_element_type=jnp.float32) * cfg.scale
    if cfg.softcap is None:
        return s, None
    t = jnp.tanh(s / cfg.softcap)
    return cfg.softcap * t, t


# Test instrumentation (see record_computed_tiles): a list while recording, else None. Read at trace time, so kernels
# traced outside the context carry no callback at all.
_computed_tiles: list | None = None


@contextlib.contextmanager
def record_computed_tiles():
    """Record every tile the kernels traced inside this context compute, as tuples (kernel, batch, q head, q block,
    kv block, masked); kernel is "fwd", "dq" or "dkv". A host callback per computed tile: for interpret-mode tests."""
    global _computed_tiles
    previous, _computed_tiles = _computed_tiles, []
    try:
        yield _computed_tiles
    finally:
        _computed_tiles = previous


def _run_tile(kinds_ref, kind_index, active, body, probe):
    """Run ``body(masked)`` for a live tile: unmasked on full tiles, masked on partial ones, nothing on skipped.

    ``probe`` = (kernel name, batch, q head, q block, kv block) identifies the tile for record_computed_tiles.
    """
    kind = kinds_ref[kind_index]
    record = _computed_tiles

    def run(masked):
        if record is not None:
            name, *ids = probe
            jax.debug.callback(lambda *i: record.append((name, *(int(x) for x in i), masked)), *ids)
        body(masked)

    pl.when(active & (kind == FULL))(lambda: run(False))
    pl.when(active & (kind == PARTIAL))(lambda: run(True))


# ----------------------------------------------------------------------------------------------------------------------
# Forward kernel: grid (B, Hq, nQ, nK steps); the last axis walks the compacted kv-block list.
# ----------------------------------------------------------------------------------------------------------------------


def _fwd_kernel(kv_blocks_ref, kinds_ref, counts_ref, q_ref, k_ref, v_ref, qmeta_ref, kmeta_ref, o_ref, lse_ref,
                m_scr, l_scr, acc_scr, *, cfg: _Config):
    b, h, qi, j = pl.program_id(0), pl.program_id(1), pl.program_id(2), pl.program_id(3)
    bq, d = acc_scr.shape

    @pl.when(j == 0)
    def _init():
        m_scr[...] = jnp.full(m_scr.shape, _MASK_VALUE, jnp.float32)
        l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
        acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

    def body(masked):
        s, _ = _logits(q_ref[...], k_ref[...], cfg)
        if masked:
            visible = _visible(qmeta_ref, kmeta_ref, cfg)
            s = jnp.where(visible, s, _MASK_VALUE)
        m_prev, l_prev = m_scr[...], l_scr[...]
        m_next = jnp.maximum(m_prev, _rows_to_lanes(jnp.max(s, axis=1), bq))
        alpha = jnp.exp(m_prev - m_next)
        p = jnp.exp(s - _lanes_to(m_next, cfg.block_k))
        if masked:
            p = jnp.where(visible, p, 0.0)
        l_scr[...] = alpha * l_prev + _rows_to_lanes(jnp.sum(p, axis=1), bq)
        m_scr[...] = m_next
        v = v_ref[...]
        pv = lax.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        acc_scr[...] = acc_scr[...] * _lanes_to(alpha, d) + pv

    _run_tile(kinds_ref, (b, qi, j), j < counts_ref[b, qi], body, ("fwd", b, h, qi, kv_blocks_ref[b, qi, j]))

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        l, m = l_scr[...], m_scr[...]
        seen = l > 0.0
        inv_l = jnp.where(seen, 1.0 / jnp.where(seen, l, 1.0), 0.0)
        o_ref[...] = (acc_scr[...] * _lanes_to(inv_l, d)).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), _EMPTY_LSE)


# ----------------------------------------------------------------------------------------------------------------------
# Backward kernels. Both recompute p = exp(s - lse) per tile from the saved log-sum-exp; di = rowsum(dO * O).
# ----------------------------------------------------------------------------------------------------------------------


def _probs_and_dlogits(q, k, v, do, lse_ref, di_ref, qmeta_ref, kmeta_ref, masked, cfg: _Config):
    """p and dS (the gradient w.r.t. the pre-scale logits q.k), f32 [bq, bk]."""
    s, t = _logits(q, k, cfg)
    p = jnp.exp(s - _lanes_to(lse_ref[...], cfg.block_k))
    if masked:
        p = jnp.where(_visible(qmeta_ref, kmeta_ref, cfg), p, 0.0)
    dp = lax.dot_general(do, v, _NT_DIMS, preferred_element_type=jnp.float32)
    ds = p * (dp - _lanes_to(di_ref[...], cfg.block_k))
    if t is not None:
        ds = ds * (1.0 - t * t)  # d(cap * tanh(x / cap)) / dx
    return p, ds


def _dq_kernel(kv_blocks_ref, kinds_ref, counts_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, qmeta_ref,
               kmeta_ref, dq_ref, dq_scr, *, cfg: _Config):
    b, h, qi, j = pl.program_id(0), pl.program_id(1), pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)

    def body(masked):
        k = k_ref[...]
        _, ds = _probs_and_dlogits(q_ref[...], k, v_ref[...], do_ref[...], lse_ref, di_ref, qmeta_ref, kmeta_ref,
                                   masked, cfg)
        dq_scr[...] += lax.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32) * cfg.scale

    _run_tile(kinds_ref, (b, qi, j), j < counts_ref[b, qi], body, ("dq", b, h, qi, kv_blocks_ref[b, qi, j]))

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        dq_ref[...] = dq_scr[...].astype(dq_ref.dtype)


def _dkv_kernel(q_blocks_ref, kinds_ref, counts_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, qmeta_ref,
                kmeta_ref, dk_ref, dv_ref, dk_scr, dv_scr, *, cfg: _Config):
    """Grid (B, Hkv, nK, group, nQ steps): one kv block accumulates over the q heads of its group and its q blocks."""
    b, h, ki, g, j = (pl.program_id(axis) for axis in range(5))

    @pl.when((g == 0) & (j == 0))
    def _init():
        dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
        dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

    def body(masked):
        q, do = q_ref[...], do_ref[...]
        p, ds = _probs_and_dlogits(q, k_ref[...], v_ref[...], do, lse_ref, di_ref, qmeta_ref, kmeta_ref, masked, cfg)
        dv_scr[...] += lax.dot(p.T.astype(do.dtype), do, preferred_element_type=jnp.float32)
        dk_scr[...] += lax.dot(ds.T.astype(q.dtype), q, preferred_element_type=jnp.float32) * cfg.scale

    probe = ("dkv", b, h * cfg.group + g, q_blocks_ref[b, ki, j], ki)
    _run_tile(kinds_ref, (b, ki, j), j < counts_ref[b, ki], body, probe)

    @pl.when((g == pl.num_programs(3) - 1) & (j == pl.num_programs(4) - 1))
    def _finish():
        dk_ref[...] = dk_scr[...].astype(dk_ref.dtype)
        dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


# ----------------------------------------------------------------------------------------------------------------------
# pallas_call builders (all arrays are padded to whole blocks, heads-major)
# ----------------------------------------------------------------------------------------------------------------------


def _interpret_param(interpret: bool):
    # TPU interpret mode simulates the TPU memory spaces (SMEM scalar prefetch, VMEM blocks, DMAs with bounds checks),
    # so it is the faithful CPU stand-in; the generic HLO interpreter (True) is the fallback where it is missing.
    if not interpret:
        return False
    params = getattr(pltpu, "InterpretParams", None)
    return params() if params is not None else True


# Matmul FLOPs per (block_q x block_k x head_dim) tile, in units of block_q * block_k * head_dim: the forward's QK^T
# and PV; dQ recomputes QK^T, then dO V^T and dS K; dK/dV recompute QK^T, then dO V^T, P^T dO and dS^T Q.
_TILE_FLOPS = {"mllm_flash_fwd": 4, "mllm_flash_dq": 6, "mllm_flash_dkv": 8}


def _cost_estimate(name: str, grid, cfg: _Config, head_dim: int, operands, out_shape) -> pl.CostEstimate:
    """What XLA's cost analysis counts for this kernel (a pallas_call's FLOPs are only what it declares). Every
    grid step is counted as a computed tile: the live tiles are known only at run time, so for a masked attention
    this is an upper bound (a causal mask computes about half)."""
    steps = math.prod(grid)
    nbytes = lambda x: math.prod(x.shape) * jnp.dtype(x.dtype).itemsize  # noqa: E731
    return pl.CostEstimate(
        flops=int(_TILE_FLOPS[name] * steps * cfg.block_q * cfg.block_k * head_dim),
        transcendentals=int(steps * cfg.block_q * cfg.block_k),  # one exp per logit
        bytes_accessed=int(sum(nbytes(x) for x in jax.tree.leaves((operands, out_shape)))),
    )


def _pallas_call(kernel, cfg: _Config, grid, in_specs, out_specs, scratch_shapes, out_shape, semantics, name,
                 operands):
    """pallas_call of ``kernel`` over ``grid`` with the three compacted tile-list arrays as scalar prefetch, applied
    to ``operands`` (the tile lists first)."""
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=3,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        scratch_shapes=scratch_shapes,
    )
    head_dim = operands[3].shape[-1]  # q, after the three tile lists
    return pl.pallas_call(
        functools.partial(kernel, cfg=cfg),
        grid_spec=grid_spec,
        out_shape=out_shape,
        compiler_params=pltpu.CompilerParams(dimension_semantics=semantics),
        interpret=_interpret_param(cfg.interpret),
        name=name,
        cost_estimate=_cost_estimate(name, grid, cfg, head_dim, operands, out_shape),
    )(*operands)


def _in_specs(q_map, kv_map, qmeta_map, kmeta_map, cfg: _Config, d, backward):
    """Block specs of the operands every kernel takes in this order: q, k, v, then (backward) dO, lse, di, then the
    q and k metadata."""
    bq, bk = cfg.block_q, cfg.block_k
    specs = [
        pl.BlockSpec((None, None, bq, d), q_map),
        pl.BlockSpec((None, None, bk, d), kv_map),
        pl.BlockSpec((None, None, bk, d), kv_map),
    ]
    if backward:
        specs += [
            pl.BlockSpec((None, None, bq, d), q_map),  # dO
            pl.BlockSpec((None, None, bq, _LANES), q_map),  # lse
            pl.BlockSpec((None, None, bq, _LANES), q_map),  # di
        ]
    return specs + [pl.BlockSpec((None, 3, bq, _LANES), qmeta_map), pl.BlockSpec((None, 3, bk), kmeta_map)]


def _q_major_index_maps(group):
    """Index maps of the fwd and dQ grids (B, Hq, nQ, nK steps); kv blocks come from the compacted list kvb."""

    def q_map(bi, h, qi, j, kvb, kinds, cnt):
        return bi, h, qi, 0

    def kv_map(bi, h, qi, j, kvb, kinds, cnt):
        return bi, lax.div(h, group), kvb[bi, qi, j], 0  # lax.div, not //: h >= 0 and Mosaic has no sign op

    def qmeta_map(bi, h, qi, j, kvb, kinds, cnt):
        return bi, 0, qi, 0

    def kmeta_map(bi, h, qi, j, kvb, kinds, cnt):
        return bi, 0, kvb[bi, qi, j]

    return q_map, kv_map, qmeta_map, kmeta_map


def _q_major_grid(q, k, cfg: _Config):
    """The fwd and dQ grid (B, Hq, nQ, nK steps)."""
    b, hq, sq, _ = q.shape
    return b, hq, sq // cfg.block_q, k.shape[2] // cfg.block_k


def _fwd_call(q, k, v, qmeta, kmeta, fwd_plan, cfg: _Config):
    b, hq, sq, d = q.shape
    bq = cfg.block_q
    maps = _q_major_index_maps(cfg.group)
    q_map = maps[0]
    return _pallas_call(
        _fwd_kernel, cfg, _q_major_grid(q, k, cfg),
        in_specs=_in_specs(*maps, cfg, d, backward=False),
        out_specs=[
            pl.BlockSpec((None, None, bq, d), q_map),
            pl.BlockSpec((None, None, bq, _LANES), q_map),
        ],
        scratch_shapes=[
            pltpu.VMEM((bq, _LANES), jnp.float32),  # running max m (lane-replicated)
            pltpu.VMEM((bq, _LANES), jnp.float32),  # running denominator l
            pltpu.VMEM((bq, d), jnp.float32),  # output accumulator
        ],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((b, hq, sq, _LANES), jnp.float32),
        ],
        semantics=("parallel", "parallel", "parallel", "arbitrary"),
        name="mllm_flash_fwd",
        operands=(*fwd_plan, q, k, v, qmeta, kmeta),
    )


def _dq_call(q, k, v, do, lse, di, qmeta, kmeta, fwd_plan, cfg: _Config):
    d = q.shape[3]
    bq = cfg.block_q
    maps = _q_major_index_maps(cfg.group)
    return _pallas_call(
        _dq_kernel, cfg, _q_major_grid(q, k, cfg),
        in_specs=_in_specs(*maps, cfg, d, backward=True),
        out_specs=pl.BlockSpec((None, None, bq, d), maps[0]),
        scratch_shapes=[pltpu.VMEM((bq, d), jnp.float32)],
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        semantics=("parallel", "parallel", "parallel", "arbitrary"),
        name="mllm_flash_dq",
        operands=(*fwd_plan, q, k, v, do, lse, di, qmeta, kmeta),
    )


def _dkv_call(q, k, v, do, lse, di, qmeta, kmeta, bwd_plan, cfg: _Config):
    b, hkv, sk, d = k.shape
    n_q, n_k = q.shape[2] // cfg.block_q, sk // cfg.block_k
    bk, group = cfg.block_k, cfg.group

    def q_map(bi, h, ki, g, j, qb, kinds, cnt):
        return bi, h * group + g, qb[bi, ki, j], 0

    def kv_map(bi, h, ki, g, j, qb, kinds, cnt):
        return bi, h, ki, 0

    def qmeta_map(bi, h, ki, g, j, qb, kinds, cnt):
        return bi, 0, qb[bi, ki, j], 0

    def kmeta_map(bi, h, ki, g, j, qb, kinds, cnt):
        return bi, 0, ki

    return _pallas_call(
        _dkv_kernel, cfg, (b, hkv, n_k, group, n_q),
        in_specs=_in_specs(q_map, kv_map, qmeta_map, kmeta_map, cfg, d, backward=True),
        out_specs=[pl.BlockSpec((None, None, bk, d), kv_map), pl.BlockSpec((None, None, bk, d), kv_map)],
        scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, d), jnp.float32)],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        semantics=("parallel", "parallel", "parallel", "arbitrary", "arbitrary"),
        name="mllm_flash_dkv",
        operands=(*bwd_plan, q, k, v, do, lse, di, qmeta, kmeta),
    )


# ----------------------------------------------------------------------------------------------------------------------
# custom_vjp over the padded, heads-major arrays
# ----------------------------------------------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg, q, k, v, qmeta, kmeta, fwd_plan, bwd_plan):
    return _fwd_call(q, k, v, qmeta, kmeta, fwd_plan, cfg)[0]


def _flash_fwd(cfg, q, k, v, qmeta, kmeta, fwd_plan, bwd_plan):
    out, lse = _fwd_call(q, k, v, qmeta, kmeta, fwd_plan, cfg)
    return out, (q, k, v, qmeta, kmeta, fwd_plan, bwd_plan, out, lse)


def _flash_bwd(cfg, residuals, d_out):
    q, k, v, qmeta, kmeta, fwd_plan, bwd_plan, out, lse = residuals
    di = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [B, Hq, Sq]
    di = jnp.broadcast_to(di[..., None], lse.shape)
    do = d_out.astype(q.dtype)
    dq = _dq_call(q, k, v, do, lse, di, qmeta, kmeta, fwd_plan, cfg)
    dk, dv = _dkv_call(q, k, v, do, lse, di, qmeta, kmeta, bwd_plan, cfg)
    return dq, dk, dv, None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ----------------------------------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------------------------------


def _round_up(x, m):
    return -(-x // m) * m


def _sublanes(dtype):
    """Rows of one native TPU tile: 8 for 32-bit, 16 for 16-bit, 32 for 8-bit types."""
    return 8 * max(1, 4 // jnp.dtype(dtype).itemsize)


def _check_blocks(block_q, block_k, dtype):
    sublanes = _sublanes(dtype)
    if block_q <= 0 or block_q % sublanes:
        raise ValueError(f"block_q must be a positive multiple of {sublanes} for {jnp.dtype(dtype).name} (TPU "
                         f"sublane tiling); got {block_q}")
    if block_k <= 0 or block_k % _LANES:
        raise ValueError(f"block_k must be a positive multiple of {_LANES} (TPU lane tiling); got {block_k}")


def _pad_seq(x, length, axis=1):
    extra = length - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths)


def _pad_meta(meta: TokenMeta, length) -> TokenMeta:
    # Zero padding: segment 0 marks the padding tokens, which attend nothing and are seen by nothing.
    return TokenMeta(*(_pad_seq(jnp.asarray(a, jnp.int32), length) for a in meta))


def tile_plan(q_meta: TokenMeta, k_meta: TokenMeta, block_q: int, block_k: int, *, window=None,
              span_isolated=False):
    """The compacted tile lists the kernels walk (jnp): ((kv_blocks, kinds, counts) per q block,
    (q_blocks, kinds, counts) per kv block). kv_blocks [B, nQ, nK] lists the non-skipped kv blocks of each q block in
    ascending order, then repeats the last one; counts [B, nQ] says how many are live. Metadata must be padded to
    whole blocks or is padded here with segment 0."""
    sq, sk = _round_up(q_meta.shape[1], block_q), _round_up(k_meta.shape[1], block_k)
    bmap = block_map(_pad_meta(q_meta, sq), _pad_meta(k_meta, sk), block_q, block_k, window=window,
                     span_isolated=span_isolated, xp=jnp)
    return compact(bmap, repeat_last=True), compact(jnp.swapaxes(bmap, 1, 2), repeat_last=True)


def flash_attention(
    q,
    k,
    v,
    q_meta: TokenMeta,
    k_meta: TokenMeta,
    *,
    block_q: int | None = None,
    block_k: int | None = None,
    scale: float | None = None,
    window: int | None = None,
    softcap: float | None = None,
    span_isolated: bool = False,
    interpret: bool = False,
):
    """Block-sparse flash attention on TPU. q [B, Sq, Hq, D], k/v [B, Sk, Hkv, D] -> [B, Sq, Hq, D].

    The mask is the rule of kernels.meta applied to q_meta and k_meta ([B, Sq] and [B, Sk] int32). Differentiable
    (custom_vjp with Pallas dQ and dK/dV kernels). block_q must be a multiple of 8 (16 for 16-bit dtypes), block_k a
    multiple of 128; defaults 128 each (block_q shrunk to the padded length for short queries). ``interpret=True``
    runs the kernels on CPU with the Pallas interpreter.
    """
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be [B, S, H, D]; got shapes {q.shape}, {k.shape}, {v.shape}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape; got {k.shape} and {v.shape}")
    b, sq, hq, d = q.shape
    _, sk, hkv, _ = k.shape
    if k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"k batch/head_dim {k.shape[0]}/{k.shape[3]} do not match q's {b}/{d}")
    check_gqa(hq, hkv)
    for name, meta, want in (("q_meta", q_meta, (b, sq)), ("k_meta", k_meta, (b, sk))):
        shapes = [tuple(jnp.shape(a)) for a in meta]
        if any(s != want for s in shapes):
            raise ValueError(f"{name} arrays must have shape {want}; got {shapes}")
    if window is not None and window <= 0:
        raise ValueError(f"window must be a positive number of positions; got {window}")
    if softcap is not None and softcap <= 0:
        raise ValueError(f"softcap must be positive; got {softcap}")
    if block_q is None:
        block_q = min(_DEFAULT_BLOCK, _round_up(sq, _sublanes(q.dtype)))
    block_k = _DEFAULT_BLOCK if block_k is None else block_k
    _check_blocks(block_q, block_k, q.dtype)

    sq_pad, sk_pad = _round_up(sq, block_q), _round_up(sk, block_k)
    q_meta_p, k_meta_p = _pad_meta(q_meta, sq_pad), _pad_meta(k_meta, sk_pad)
    fwd_plan, bwd_plan = tile_plan(q_meta_p, k_meta_p, block_q, block_k, window=window, span_isolated=span_isolated)

    qmeta_B3QL = jnp.broadcast_to(jnp.stack(q_meta_p, axis=1)[..., None], (b, 3, sq_pad, _LANES))
    kmeta_B3K = jnp.stack(k_meta_p, axis=1)

    def heads_major(x, length):
        return jnp.swapaxes(_pad_seq(x, length), 1, 2)  # [B, H, S, D]

    cfg = _Config(**config_fields(block_q, block_k, d, scale, window, softcap, span_isolated), group=hq // hkv,
                  interpret=bool(interpret))
    out_BHQD = _flash(cfg, heads_major(q, sq_pad), heads_major(k, sk_pad), heads_major(v, sk_pad), qmeta_B3QL,
                      kmeta_B3K, fwd_plan, bwd_plan)
    return jnp.swapaxes(out_BHQD, 1, 2)[:, :sq]
