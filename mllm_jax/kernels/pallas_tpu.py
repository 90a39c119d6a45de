"""Flash attention for TPU in Pallas (Mosaic), block-sparse over the multimodal mask (docs/kernels.md; the mask rule
is docs/architecture.md, 'Token metadata and the attention rule').

Layout. The wrapper pads every sequence to whole blocks (padding tokens have segment 0: they see nothing and nothing
sees them), folds the batch into the sequence and puts heads in front, grouped by kv head:

    q, dO   [Hkv, G, B*Sq, D]      (G = query heads per kv head: GQA is handled inside every kernel)
    k, v    [Hkv, B*Sk, D]
    lse, di [Hkv, G, B*Sq] f32     (one float per row, no lane broadcast)
    meta    [8, B*S] int32         (rows 0..2: position, segment, span; 5 rows of padding for the (8, 128) tiling)

so a (flat) block index names both the batch row and the block inside it.

Grid over the live tiles only. ``kernels.meta.block_map`` classifies every (q block, k block) tile as skip / partial /
full; the live ones (partial or full) are listed in order, q-major for the forward and dQ passes and k-major for
dK/dV, as two int32 arrays handed to the kernel by scalar prefetch (SMEM): ``rows`` (the flat block that stays
resident: q for fwd/dQ, k for dK/dV) and ``cols`` (the flat block that streams, with the tile kind in bits 28-29).
The grid is (Hkv, number of live tiles): one grid step is one live tile for all G query heads of a kv head, so nothing
is fetched or stepped over for a skipped tile. The grid size is the live-tile count itself: a Python int when the
metadata are concrete (the tile lists are built on the host with numpy, SMEM = exactly the live tiles), a traced
scalar (Pallas' dynamic grid bound) when they are traced (the lists then have the static capacity of every tile of
the chunk, and only the live ones are stepped).

Bounded SMEM. The tile lists are cut into chunks of at most ``MAX_TILES_PER_CALL`` tiles at row boundaries (8 bytes a
tile, ``SMEM_BUDGET_BYTES`` in all, a quarter of the 1 MiB SMEM of v4/v5e/v5p/v6e); each chunk is one pallas_call
that writes its rows into the output buffer it is aliased to (rows with no live tile keep the initial zeros, or the
empty-row log-sum-exp), so SMEM use does not grow with the sequence.

Partial tiles are masked in the kernel from the token metadata of both sides taken separately (any permutation of
the tokens is exact); full tiles run unmasked. The resident side's metadata (and, for dQ, its lse and di) are turned
from rows into lane-replicated columns once per resident block, not per tile.

Numerics. bf16 (or f32) operands on the MXU with f32 accumulation; logits and softmax statistics are f32. Masked
logits take a finite ``_MASK_VALUE`` and masked probabilities are forced to exactly 0, so rows that see nothing keep
l = 0 and return 0 (and zero gradients), never NaN. dK/dV are computed from the transposed logits (k rows, q lanes),
so their lse and di are rows too and the group's G query heads are summed in the kernel's f32 accumulator.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from mllm_jax.kernels._common import check_gqa, config_fields, config_type, traced_generation
from mllm_jax.kernels.meta import FULL, PARTIAL, SKIP, TokenMeta, block_map

_LANES = 128
_META_ROWS = 8  # metadata rows per token block: the 3 fields padded to one (8, 128) tile
# Finite, so a row with nothing visible yet computes exp(MASK - MASK) = 1 instead of exp(-inf + inf) = NaN; its
# probabilities are then zeroed explicitly.
_MASK_VALUE = -1e30
# Log-sum-exp stored for a row that sees nothing: exp(logit - _EMPTY_LSE) underflows to exactly 0 in the backward.
_EMPTY_LSE = 1e30
_NT_DIMS = (((1,), (1,)), ((), ()))  # a @ b.T
_KIND_SHIFT = 28  # cols entry = flat block | kind << 28 (flat blocks < 2^28)

# SMEM: every TPU from v4 on has 1 MiB per core (a prefetch over it fails to compile: 'Ran out of memory in memory
# space smem'). The tile lists of one call take at most a quarter of it, 8 bytes a tile.
SMEM_BYTES = 1 << 20
SMEM_BUDGET_BYTES = SMEM_BYTES // 4
_TILE_BYTES = 8
MAX_TILES_PER_CALL = SMEM_BUDGET_BYTES // _TILE_BYTES - 1  # one sentinel entry per list

# VMEM per TensorCore (bytes): v5e / v6e 128 MiB, v4 / v5p 128 MiB / 95 MiB. The kernels ask Mosaic for their own
# estimate (blocks double-buffered, scratch, the f32 tile intermediates) with a margin, never above VMEM_LIMIT_BYTES.
VMEM_LIMIT_BYTES = 64 << 20

# Default (block_q, block_k) per TPU generation for head_dim <= 128 (head_dim 256 halves block_k). A step's MXU work is
# G * 4 * bq * bk * D FLOPs against ~0.35 us of step overhead and a (bk, D) K/V fetch; these make both small next to
# the matmuls at G >= 4 (the arithmetic of docs/kernels.md): v5e (197 TF/s, 819 GB/s) and v5p (459 TF/s, 2.8 TB/s)
# 512 x 1024; v6e (918 TF/s) needs twice the rows per step to hide the same overhead: 1024 x 1024.
DEFAULT_BLOCKS = {"v4": (512, 1024), "v5e": (512, 1024), "v5p": (512, 1024), "v6e": (1024, 1024)}
_DEFAULT_GENERATION = "v5e"


# Static kernel parameters (hashable: a nondiff argument of the custom_vjp); group: query heads per kv head;
# n_q / n_k: blocks per batch row (to name a flat block's batch row in the test probe).
_Config = config_type("_Config", group=int, interpret=bool, n_q=int, n_k=int)


def tpu_generation() -> str:
    """The TPU generation of the device being traced for ("v4", "v5e", "v5p", "v6e"): a compile for a target from a
    CPU host gets its target's (``_common.traced_generation``); else _DEFAULT_GENERATION (a CPU run, an unknown
    TPU)."""
    gen = traced_generation()
    return gen if gen in DEFAULT_BLOCKS else _DEFAULT_GENERATION


def default_blocks(head_dim: int, generation: str | None = None) -> tuple[int, int]:
    """(block_q, block_k) for ``head_dim`` on ``generation`` (default: the running one)."""
    gen = generation or tpu_generation()
    if gen not in DEFAULT_BLOCKS:
        raise ValueError(f"generation must be one of {sorted(DEFAULT_BLOCKS)}; got {gen!r}")
    bq, bk = DEFAULT_BLOCKS[gen]
    return (bq, bk) if head_dim <= 128 else (bq, bk // 2)


# ----------------------------------------------------------------------------------------------------------------------
# Tile lists (host numpy for concrete metadata, jnp on device for traced metadata)
# ----------------------------------------------------------------------------------------------------------------------


class TileChunk(NamedTuple):
    """One pallas_call's tile list: ``rows`` / ``cols`` int32 [capacity + 1] (a -1 row ends the list), ``count``
    live tiles (int, or a traced int32 scalar), and the flat resident-block range [start, stop) it covers."""

    rows: object
    cols: object
    count: object
    start: int
    stop: int


def _is_concrete(*arrays) -> bool:
    return not any(isinstance(a, jax.core.Tracer) for a in arrays)


def _host_chunks(bmap, max_tiles: int) -> list[TileChunk]:
    """Exact lists from a numpy block map [B, nR, nC] (rows resident), cut at row boundaries into chunks of at most
    ``max_tiles`` live tiles."""
    b, n_r, n_c = bmap.shape
    bi, ri, ci = np.nonzero(bmap != SKIP)  # row-major: ascending (batch, row, col)
    rows = (bi * n_r + ri).astype(np.int32)
    cols = ((bi * n_c + ci) | (bmap[bi, ri, ci].astype(np.int64) << _KIND_SHIFT)).astype(np.int32)
    per_row = np.bincount(rows, minlength=b * n_r)
    if per_row.max(initial=0) > max_tiles:
        raise ValueError(f"one block row has {per_row.max()} live tiles, more than the {max_tiles} one call's SMEM "
                         f"tile list holds; use larger blocks")
    chunks, start_tile, start_row, in_chunk = [], 0, 0, 0
    for r in range(b * n_r + 1):
        n = per_row[r] if r < b * n_r else 0
        if r == b * n_r or in_chunk + n > max_tiles:
            if in_chunk:
                sl = slice(start_tile, start_tile + in_chunk)
                chunks.append(TileChunk(np.append(rows[sl], -1).astype(np.int32), np.append(cols[sl], 0).astype(
                    np.int32), int(in_chunk), start_row, r))
            start_tile, start_row, in_chunk = start_tile + in_chunk, r, 0
        in_chunk += n
    return chunks


def _device_chunks(bmap, max_tiles: int) -> list[TileChunk]:
    """Lists from a traced block map: static ranges of resident blocks with capacity for all their tiles, the live
    ones compacted to the front (stable: ascending) and counted; the grid then steps only ``count`` of them."""
    b, n_r, n_c = bmap.shape
    if n_c > max_tiles:
        raise ValueError(f"a block row has {n_c} tiles, more than the {max_tiles} one call's SMEM tile list holds; "
                         f"use larger blocks")
    flat = bmap.reshape(b * n_r, n_c)
    per_chunk = max(1, max_tiles // n_c)
    chunks = []
    for start in range(0, b * n_r, per_chunk):
        stop = min(start + per_chunk, b * n_r)
        kinds = flat[start:stop].reshape(-1)
        order = jnp.argsort(kinds == SKIP, stable=True).astype(jnp.int32)
        count = jnp.sum(kinds != SKIP).astype(jnp.int32)
        row = start + order // n_c
        col = (row // n_r) * n_c + order % n_c
        live = jnp.arange(order.shape[0], dtype=jnp.int32) < count
        rows = jnp.where(live, row, -1)
        cols = jnp.where(live, col | (jnp.take(kinds, order) << _KIND_SHIFT), 0)
        tail = jnp.array([-1], jnp.int32)
        chunks.append(TileChunk(jnp.concatenate([rows, tail]), jnp.concatenate([cols, tail * 0]), count, start, stop))
    return chunks


class TilePlan(NamedTuple):
    """Tile lists of the three kernels: ``q_major`` (forward and dQ) and ``k_major`` (dK/dV) chunk lists."""

    q_major: list
    k_major: list


def tile_plan(q_meta: TokenMeta, k_meta: TokenMeta, block_q: int, block_k: int, *, window=None,
              span_isolated=False, max_tiles: int = MAX_TILES_PER_CALL) -> TilePlan:
    """The tile lists the kernels walk. Concrete metadata (numpy or concrete jax arrays) give exact host lists;
    traced metadata give device lists of static capacity. Metadata are padded to whole blocks with segment 0."""
    sq, sk = _round_up(q_meta.shape[1], block_q), _round_up(k_meta.shape[1], block_k)
    if _is_concrete(*q_meta, *k_meta):
        qm = TokenMeta(*(np.asarray(a, np.int32) for a in _pad_meta(q_meta, sq, np)))
        km = TokenMeta(*(np.asarray(a, np.int32) for a in _pad_meta(k_meta, sk, np)))
        bmap = np.asarray(block_map(qm, km, block_q, block_k, window=window, span_isolated=span_isolated, xp=np))
        return TilePlan(_host_chunks(bmap, max_tiles), _host_chunks(bmap.transpose(0, 2, 1), max_tiles))
    bmap = block_map(_pad_meta(q_meta, sq, jnp), _pad_meta(k_meta, sk, jnp), block_q, block_k, window=window,
                     span_isolated=span_isolated, xp=jnp)
    return TilePlan(_device_chunks(bmap, max_tiles), _device_chunks(jnp.swapaxes(bmap, 1, 2), max_tiles))


def plan_steps(plan: TilePlan) -> dict:
    """Grid steps per kv head of each pass (sum of the chunks' counts; ints for a host plan)."""
    q_steps = sum(c.count for c in plan.q_major)
    return {"fwd": q_steps, "dq": q_steps, "dkv": sum(c.count for c in plan.k_major)}


def smem_bytes(chunk: TileChunk) -> int:
    """SMEM the scalar-prefetched tile list of one call takes."""
    return int(chunk.rows.shape[0] + chunk.cols.shape[0]) * 4


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


def _row_to_column(row_1N):
    """A [1, N] row as a lane-replicated [N, 128] column (broadcast to 128 sublanes, then one XLU transpose)."""
    return jnp.broadcast_to(row_1N, (_LANES, row_1N.shape[1])).T


def _column_to_row(col_N128):
    """A lane-replicated [N, 128] column as a [1, N] row."""
    return col_N128.T[0:1, :]


def _rule(pos_q, seg_q, span_q, pos_k, seg_k, span_k, cfg: _Config):
    """The mask rule of kernels.meta on broadcastable q / k operands (either orientation)."""
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


def _logits(a, b, cfg: _Config):
    """Scaled (and soft-capped) logits a @ b.T, f32; also tanh(s / cap) for the backward, or None."""
    s = lax.dot_general(a, b, _NT_DIMS, preferred_element_type=jnp.float32) * cfg.scale
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
    kv block, masked); kernel is "fwd", "dq" or "dkv". A host callback per computed tile and head: for
    interpret-mode tests."""
    global _computed_tiles
    previous, _computed_tiles = _computed_tiles, []
    try:
        yield _computed_tiles
    finally:
        _computed_tiles = previous


def _probe(name, head, q_flat, k_flat, masked, cfg: _Config):
    record = _computed_tiles
    if record is None:
        return

    def append(h, qf, kf):
        b, qi = divmod(int(qf), cfg.n_q)
        record.append((name, b, int(h), qi, int(kf) % cfg.n_k, masked))

    jax.debug.callback(append, head, q_flat, k_flat)


class _Step(NamedTuple):
    """What a kernel reads from the tile list at grid step t."""

    row: object  # flat resident block
    col: object  # flat streamed block
    kind: object
    first: object  # the first tile of this resident block: initialise
    last: object  # its last tile: finish and write


def _step(rows_ref, cols_ref) -> _Step:
    t = pl.program_id(1)
    row, packed = rows_ref[t], cols_ref[t]
    prev = rows_ref[jnp.maximum(t - 1, 0)]
    return _Step(row, packed & ((1 << _KIND_SHIFT) - 1), lax.shift_right_logical(packed, _KIND_SHIFT),
                 (t == 0) | (prev != row), rows_ref[t + 1] != row)


def _run_tile(step: _Step, body):
    """``body(masked)``: unmasked on full tiles, masked on partial ones (skipped tiles are not in the list)."""
    pl.when(step.kind == FULL)(lambda: body(False))
    pl.when(step.kind == PARTIAL)(lambda: body(True))


def _meta_columns(meta_ref, col_scr):
    """The resident block's metadata rows [8, N] as lane-replicated columns col_scr [3, N, 128]."""
    for f in range(3):
        col_scr[f] = _row_to_column(meta_ref[f : f + 1, :])


# ----------------------------------------------------------------------------------------------------------------------
# Forward: rows = q blocks; per step one k/v tile for the G query heads of kv head h.
# ----------------------------------------------------------------------------------------------------------------------


def _fwd_kernel(rows_ref, cols_ref, q_ref, k_ref, v_ref, qm_ref, km_ref, o_init, lse_init, o_ref, lse_ref,
                qcol_scr, m_scr, l_scr, acc_scr, *, cfg: _Config):
    del o_init, lse_init  # aliased to the outputs: rows without a live tile keep their initial values
    h = pl.program_id(0)
    st = _step(rows_ref, cols_ref)
    group, bq, d = acc_scr.shape
    bk = k_ref.shape[0]

    @pl.when(st.first)
    def _init():
        _meta_columns(qm_ref, qcol_scr)
        m_scr[...] = jnp.full(m_scr.shape, _MASK_VALUE, jnp.float32)
        l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
        acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

    def body(masked):
        k, v = k_ref[...], v_ref[...]
        if masked:
            visible = _rule(*(_lanes_to(qcol_scr[f], bk) for f in range(3)),
                            *(km_ref[f : f + 1, :] for f in range(3)), cfg)
        for g in range(group):
            _probe("fwd", h * group + g, st.row, st.col, masked, cfg)
            s, _ = _logits(q_ref[g], k, cfg)
            if masked:
                s = jnp.where(visible, s, _MASK_VALUE)
            m_prev, l_prev = m_scr[g], l_scr[g]
            m_next = jnp.maximum(m_prev, _rows_to_lanes(jnp.max(s, axis=1), bq))
            alpha = jnp.exp(m_prev - m_next)
            p = jnp.exp(s - _lanes_to(m_next, bk))
            if masked:
                p = jnp.where(visible, p, 0.0)
            l_scr[g] = alpha * l_prev + _rows_to_lanes(jnp.sum(p, axis=1), bq)
            m_scr[g] = m_next
            pv = lax.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
            acc_scr[g] = acc_scr[g] * _lanes_to(alpha, d) + pv

    _run_tile(st, body)

    @pl.when(st.last)
    def _finish():
        for g in range(group):
            l, m = l_scr[g], m_scr[g]
            seen = l > 0.0
            inv_l = jnp.where(seen, 1.0 / jnp.where(seen, l, 1.0), 0.0)
            o_ref[g] = (acc_scr[g] * _lanes_to(inv_l, d)).astype(o_ref.dtype)
            lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), _EMPTY_LSE)
            lse_ref[g : g + 1, :] = _column_to_row(lse)


# ----------------------------------------------------------------------------------------------------------------------
# dQ: rows = q blocks (as the forward). p = exp(s - lse) recomputed per tile; di = rowsum(dO * O).
# ----------------------------------------------------------------------------------------------------------------------


def _dq_kernel(rows_ref, cols_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, qm_ref, km_ref, dq_init, dq_ref,
               qcol_scr, lse_scr, di_scr, dq_scr, *, cfg: _Config):
    del dq_init
    h = pl.program_id(0)
    st = _step(rows_ref, cols_ref)
    group = dq_scr.shape[0]
    bk = k_ref.shape[0]

    @pl.when(st.first)
    def _init():
        _meta_columns(qm_ref, qcol_scr)
        for g in range(group):
            lse_scr[g] = _row_to_column(lse_ref[g : g + 1, :])
            di_scr[g] = _row_to_column(di_ref[g : g + 1, :])
        dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)

    def body(masked):
        k, v = k_ref[...], v_ref[...]
        if masked:
            visible = _rule(*(_lanes_to(qcol_scr[f], bk) for f in range(3)),
                            *(km_ref[f : f + 1, :] for f in range(3)), cfg)
        for g in range(group):
            _probe("dq", h * group + g, st.row, st.col, masked, cfg)
            s, t = _logits(q_ref[g], k, cfg)
            p = jnp.exp(s - _lanes_to(lse_scr[g], bk))
            if masked:
                p = jnp.where(visible, p, 0.0)
            dp = lax.dot_general(do_ref[g], v, _NT_DIMS, preferred_element_type=jnp.float32)
            ds = p * (dp - _lanes_to(di_scr[g], bk))
            if t is not None:
                ds = ds * (1.0 - t * t)  # d(cap * tanh(x / cap)) / dx
            dq_scr[g] += lax.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32) * cfg.scale

    _run_tile(st, body)

    @pl.when(st.last)
    def _finish():
        dq_ref[...] = dq_scr[...].astype(dq_ref.dtype)


# ----------------------------------------------------------------------------------------------------------------------
# dK/dV: rows = k blocks; the transposed logits s^T = k q^T [bk, bq] take lse and di as rows, and the G query heads of
# the group accumulate into one f32 dK/dV tile.
# ----------------------------------------------------------------------------------------------------------------------


def _dkv_kernel(rows_ref, cols_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, qm_ref, km_ref, dk_init, dv_init,
                dk_ref, dv_ref, kcol_scr, dk_scr, dv_scr, *, cfg: _Config):
    del dk_init, dv_init
    h = pl.program_id(0)
    st = _step(rows_ref, cols_ref)
    group, bq = q_ref.shape[0], q_ref.shape[1]

    @pl.when(st.first)
    def _init():
        _meta_columns(km_ref, kcol_scr)
        dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
        dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

    def body(masked):
        k, v = k_ref[...], v_ref[...]
        if masked:
            visible_t = _rule(*(qm_ref[f : f + 1, :] for f in range(3)),
                              *(_lanes_to(kcol_scr[f], bq) for f in range(3)), cfg)  # [bk, bq]
        for g in range(group):
            _probe("dkv", h * group + g, st.col, st.row, masked, cfg)
            q, do = q_ref[g], do_ref[g]
            s_t, t_t = _logits(k, q, cfg)
            p_t = jnp.exp(s_t - lse_ref[g : g + 1, :])
            if masked:
                p_t = jnp.where(visible_t, p_t, 0.0)
            dv_scr[...] += lax.dot(p_t.astype(do.dtype), do, preferred_element_type=jnp.float32)
            dp_t = lax.dot_general(v, do, _NT_DIMS, preferred_element_type=jnp.float32)
            ds_t = p_t * (dp_t - di_ref[g : g + 1, :])
            if t_t is not None:
                ds_t = ds_t * (1.0 - t_t * t_t)
            dk_scr[...] += lax.dot(ds_t.astype(q.dtype), q, preferred_element_type=jnp.float32) * cfg.scale

    _run_tile(st, body)

    @pl.when(st.last)
    def _finish():
        dk_ref[...] = dk_scr[...].astype(dk_ref.dtype)
        dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


# ----------------------------------------------------------------------------------------------------------------------
# pallas_call builders (arrays padded to whole blocks, heads-major, batch folded into the sequence)
# ----------------------------------------------------------------------------------------------------------------------


def _interpret_param(interpret: bool):
    # TPU interpret mode simulates the TPU memory spaces (SMEM scalar prefetch, VMEM blocks, DMAs with bounds checks)
    # and the dynamic grid bound of traced tile lists: the faithful CPU stand-in.
    if not interpret:
        return False
    params = getattr(pltpu, "InterpretParams", None)
    if params is None:
        raise RuntimeError("TPU interpret mode needs jax.experimental.pallas.tpu.InterpretParams (jax >= 0.7)")
    return params()


# Matmul FLOPs per (block_q x block_k x head_dim) tile and query head, in units of block_q * block_k * head_dim: the
# forward's QK^T and PV; dQ recomputes QK^T, then dO V^T and dS K; dK/dV recompute QK^T, then dO V^T, P^T dO, dS^T Q.
TILE_FLOPS = {"fwd": 4, "dq": 6, "dkv": 8}
_NAMES = {"fwd": "mllm_flash_fwd", "dq": "mllm_flash_dq", "dkv": "mllm_flash_dkv"}


def _padded_bytes(shape, dtype) -> int:
    """VMEM bytes of a block: the last two dims padded to the (sublanes, 128) tile of the dtype."""
    itemsize = jnp.dtype(dtype).itemsize
    shape = (1, 1, *shape)
    rows = _round_up(shape[-2], 8 * max(1, 4 // itemsize))
    return math.prod(shape[:-2]) * rows * _round_up(shape[-1], _LANES) * itemsize


class KernelSpec(NamedTuple):
    """What one pass's pallas_call moves and holds, from its block specs: per grid step, the streamed blocks'
    bytes; per resident block (a run of steps), the resident blocks' bytes read and written; its VMEM estimate."""

    stream_bytes: int  # DMA'd on a step whose streamed block changes (every step: consecutive tiles differ)
    resident_bytes: int  # DMA'd once per resident block (its inputs in, its outputs out)
    vmem_bytes: int  # blocks double-buffered + scratch + the f32 [bq, bk] intermediates of a tile


def kernel_spec(kernel: str, group: int, block_q: int, block_k: int, head_dim: int, dtype) -> KernelSpec:
    """The bytes of ``kernel`` ("fwd", "dq", "dkv") per step / per resident block and its VMEM estimate, from the
    same block shapes the pallas_calls below use."""
    g, bq, bk, d = group, block_q, block_k, head_dim
    isz = jnp.dtype(dtype).itemsize
    qb = (g, bq, d)  # q / dO / o / dq block
    kb = (bk, d)
    rows_g = (g, bq)  # lse / di block
    meta = lambda n: (_META_ROWS, n)  # noqa: E731
    nb = lambda shape, dt=dtype: math.prod(shape) * jnp.dtype(dt).itemsize  # noqa: E731  HBM bytes, unpadded
    f32, i32 = jnp.float32, jnp.int32
    if kernel == "fwd":
        stream = [(kb, dtype), (kb, dtype), (meta(bk), i32)]
        resident_in, resident_out = [(qb, dtype), (meta(bq), i32)], [(qb, dtype), (rows_g, f32)]
        scratch = [((3, bq, _LANES), i32), ((g, bq, _LANES), f32), ((g, bq, _LANES), f32), ((g, bq, d), f32)]
    elif kernel == "dq":
        stream = [(kb, dtype), (kb, dtype), (meta(bk), i32)]
        resident_in = [(qb, dtype), (qb, dtype), (rows_g, f32), (rows_g, f32), (meta(bq), i32)]
        resident_out = [(qb, dtype)]
        scratch = [((3, bq, _LANES), i32), ((g, bq, _LANES), f32), ((g, bq, _LANES), f32), ((g, bq, d), f32)]
    elif kernel == "dkv":
        stream = [(qb, dtype), (qb, dtype), (rows_g, f32), (rows_g, f32), (meta(bq), i32)]
        resident_in, resident_out = [(kb, dtype), (kb, dtype), (meta(bk), i32)], [(kb, dtype), (kb, dtype)]
        scratch = [((3, bk, _LANES), i32), (kb, f32), (kb, f32)]
    else:
        raise ValueError(f"kernel must be one of {tuple(TILE_FLOPS)}; got {kernel!r}")
    blocks = stream + resident_in + resident_out
    vmem = (2 * sum(_padded_bytes(s, t) for s, t in blocks) + sum(_padded_bytes(s, t) for s, t in scratch)
            + 6 * bq * bk * 4)  # s, p, dp, ds, the mask and a temporary: f32 [bq, bk] each
    del isz
    return KernelSpec(sum(nb(s, t) for s, t in stream), sum(nb(s, t) for s, t in resident_in + resident_out), vmem)


def vmem_limit(spec: KernelSpec) -> int:
    """The scoped-VMEM limit a pass asks Mosaic for: its estimate plus half (Mosaic's own temporaries), at least the
    16 MiB default, at most VMEM_LIMIT_BYTES (the call is refused above it)."""
    want = max(16 << 20, _round_up(spec.vmem_bytes * 3 // 2, 1 << 20))
    if want > VMEM_LIMIT_BYTES:
        raise ValueError(f"the kernel's VMEM estimate {spec.vmem_bytes / 2**20:.1f} MiB (x1.5) exceeds "
                         f"VMEM_LIMIT_BYTES = {VMEM_LIMIT_BYTES >> 20} MiB; use smaller blocks")
    return want


def _cost_estimate(kernel: str, steps_per_head: int, hkv: int, cfg: _Config, head_dim: int,
                   spec: KernelSpec) -> pl.CostEstimate:
    """What XLA's cost analysis counts for one call (a pallas_call's FLOPs are only what it declares): every listed
    tile computed for the G heads of each kv head. Exact for host lists; the static capacity for traced lists (an
    upper bound: the grid steps only the live tiles)."""
    tiles = steps_per_head * hkv * cfg.group
    return pl.CostEstimate(
        flops=int(TILE_FLOPS[kernel] * tiles * cfg.block_q * cfg.block_k * head_dim),
        transcendentals=int(tiles * cfg.block_q * cfg.block_k),  # one exp per logit
        bytes_accessed=int(steps_per_head * hkv * (spec.stream_bytes + spec.resident_bytes)),
    )


def _call(kernel_name, body, cfg: _Config, chunk: TileChunk, hkv, in_specs, out_specs, scratch, out_shape,
          operands, inits, head_dim, dtype):
    """One pallas_call of ``body`` over grid (hkv, chunk.count), the chunk's tile lists as scalar prefetch, the
    outputs aliased to ``inits`` (passed last, left in HBM)."""
    spec = kernel_spec(kernel_name, cfg.group, cfg.block_q, cfg.block_k, head_dim, dtype)
    n_in = 2 + len(operands)
    any_spec = pl.BlockSpec(memory_space=pl.ANY)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(hkv, chunk.count),
        in_specs=[*in_specs, *([any_spec] * len(inits))],
        out_specs=out_specs,
        scratch_shapes=scratch,
    )
    capacity = chunk.rows.shape[0] - 1
    return pl.pallas_call(
        functools.partial(body, cfg=cfg),
        grid_spec=grid_spec,
        out_shape=out_shape,
        input_output_aliases={n_in + i: i for i in range(len(inits))},
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary"),
                                             vmem_limit_bytes=vmem_limit(spec)),
        interpret=_interpret_param(cfg.interpret),
        name=_NAMES[kernel_name],
        cost_estimate=_cost_estimate(kernel_name, capacity, hkv, cfg, head_dim, spec),
    )(jnp.asarray(chunk.rows), jnp.asarray(chunk.cols), *operands, *inits)


def _col(cols_ref, t):
    return cols_ref[t] & ((1 << _KIND_SHIFT) - 1)


def _q_major_specs(cfg: _Config, d, backward):
    """Block specs of fwd / dQ: q-side blocks follow rows[t], k-side blocks follow cols[t]."""
    g, bq, bk = cfg.group, cfg.block_q, cfg.block_k

    def q_map(h, t, rows, cols):
        return h, 0, rows[t], 0

    def kv_map(h, t, rows, cols):
        return h, _col(cols, t), 0

    def rows_map(h, t, rows, cols):
        return h, 0, rows[t]

    def qmeta_map(h, t, rows, cols):
        return 0, rows[t]

    def kmeta_map(h, t, rows, cols):
        return 0, _col(cols, t)

    q_spec = pl.BlockSpec((None, g, bq, d), q_map)
    specs = [q_spec, pl.BlockSpec((None, bk, d), kv_map), pl.BlockSpec((None, bk, d), kv_map)]
    if backward:
        specs += [q_spec, pl.BlockSpec((None, g, bq), rows_map), pl.BlockSpec((None, g, bq), rows_map)]
    specs += [pl.BlockSpec((_META_ROWS, bq), qmeta_map), pl.BlockSpec((_META_ROWS, bk), kmeta_map)]
    return specs, q_spec, pl.BlockSpec((None, g, bq), rows_map)


def _fwd(q, k, v, qm, km, plan: TilePlan, cfg: _Config, out_dtype=None):
    hkv, g, sq, d = q.shape
    bq = cfg.block_q
    out_dtype = out_dtype or q.dtype
    in_specs, q_spec, lse_spec = _q_major_specs(cfg, d, backward=False)
    out = jnp.zeros(q.shape, out_dtype)
    lse = jnp.full((hkv, g, sq), _EMPTY_LSE, jnp.float32)
    for chunk in plan.q_major:
        out, lse = _call(
            "fwd", _fwd_kernel, cfg, chunk, hkv, in_specs, [q_spec, lse_spec],
            [pltpu.VMEM((3, bq, _LANES), jnp.int32), pltpu.VMEM((g, bq, _LANES), jnp.float32),
             pltpu.VMEM((g, bq, _LANES), jnp.float32), pltpu.VMEM((g, bq, d), jnp.float32)],
            [jax.ShapeDtypeStruct(q.shape, out_dtype), jax.ShapeDtypeStruct(lse.shape, jnp.float32)],
            (q, k, v, qm, km), (out, lse), d, q.dtype)
    return out, lse


def _dq(q, k, v, do, lse, di, qm, km, plan: TilePlan, cfg: _Config, out_dtype=None):
    hkv, g, sq, d = q.shape
    bq = cfg.block_q
    out_dtype = out_dtype or q.dtype
    in_specs, q_spec, _ = _q_major_specs(cfg, d, backward=True)
    dq = jnp.zeros(q.shape, out_dtype)
    for chunk in plan.q_major:
        (dq,) = _call(
            "dq", _dq_kernel, cfg, chunk, hkv, in_specs, [q_spec],
            [pltpu.VMEM((3, bq, _LANES), jnp.int32), pltpu.VMEM((g, bq, _LANES), jnp.float32),
             pltpu.VMEM((g, bq, _LANES), jnp.float32), pltpu.VMEM((g, bq, d), jnp.float32)],
            [jax.ShapeDtypeStruct(q.shape, out_dtype)],
            (q, k, v, do, lse, di, qm, km), (dq,), d, q.dtype)
    return dq


def _dkv(q, k, v, do, lse, di, qm, km, plan: TilePlan, cfg: _Config, out_dtype=None):
    hkv, g, _, d = q.shape
    out_dtype = out_dtype or k.dtype
    bq, bk = cfg.block_q, cfg.block_k

    def q_map(h, t, rows, cols):
        return h, 0, _col(cols, t), 0

    def kv_map(h, t, rows, cols):
        return h, rows[t], 0

    def rows_map(h, t, rows, cols):
        return h, 0, _col(cols, t)

    def qmeta_map(h, t, rows, cols):
        return 0, _col(cols, t)

    def kmeta_map(h, t, rows, cols):
        return 0, rows[t]

    q_spec, kv_spec = pl.BlockSpec((None, g, bq, d), q_map), pl.BlockSpec((None, bk, d), kv_map)
    lse_spec = pl.BlockSpec((None, g, bq), rows_map)
    in_specs = [q_spec, kv_spec, kv_spec, q_spec, lse_spec, lse_spec, pl.BlockSpec((_META_ROWS, bq), qmeta_map),
                pl.BlockSpec((_META_ROWS, bk), kmeta_map)]
    dk, dv = jnp.zeros(k.shape, out_dtype), jnp.zeros(v.shape, out_dtype)
    for chunk in plan.k_major:
        dk, dv = _call(
            "dkv", _dkv_kernel, cfg, chunk, hkv, in_specs, [kv_spec, kv_spec],
            [pltpu.VMEM((3, bk, _LANES), jnp.int32), pltpu.VMEM((bk, d), jnp.float32),
             pltpu.VMEM((bk, d), jnp.float32)],
            [jax.ShapeDtypeStruct(k.shape, out_dtype), jax.ShapeDtypeStruct(v.shape, out_dtype)],
            (q, k, v, do, lse, di, qm, km), (dk, dv), d, q.dtype)
    return dk, dv


# ----------------------------------------------------------------------------------------------------------------------
# custom_vjp over the padded, grouped, batch-folded arrays
# ----------------------------------------------------------------------------------------------------------------------


def _split_plan(plan: TilePlan):
    """(static, arrays): the hashable part of a plan (host counts, block ranges) for the custom_vjp's nondiff
    argument, and its arrays (tile lists, traced counts)."""
    static = tuple(tuple((c.count if isinstance(c.count, int) else None, c.start, c.stop) for c in chunks)
                   for chunks in plan)
    arrays = tuple(tuple((c.rows, c.cols, None if isinstance(c.count, int) else c.count) for c in chunks)
                   for chunks in plan)
    return static, arrays


def _join_plan(static, arrays) -> TilePlan:
    return TilePlan(*([TileChunk(rows, cols, n if n is not None else count, start, stop)
                       for (n, start, stop), (rows, cols, count) in zip(s, a)] for s, a in zip(static, arrays)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _flash(cfg, static, q, k, v, qm, km, arrays):
    return _fwd(q, k, v, qm, km, _join_plan(static, arrays), cfg)[0]


def _flash_fwd(cfg, static, q, k, v, qm, km, arrays):
    out, lse = _fwd(q, k, v, qm, km, _join_plan(static, arrays), cfg)
    return out, (q, k, v, qm, km, arrays, out, lse)


def _flash_bwd(cfg, static, residuals, d_out):
    q, k, v, qm, km, arrays, out, lse = residuals
    plan = _join_plan(static, arrays)
    di = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [Hkv, G, B*Sq]
    do = d_out.astype(q.dtype)
    dq = _dq(q, k, v, do, lse, di, qm, km, plan, cfg)
    dk, dv = _dkv(q, k, v, do, lse, di, qm, km, plan, cfg)
    return dq, dk, dv, None, None, jax.tree.map(lambda _: None, arrays)


_flash.defvjp(_flash_fwd, _flash_bwd)


# ----------------------------------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------------------------------


def _round_up(x, m):
    return -(-x // m) * m


def _check_blocks(block_q, block_k):
    for name, block in (("block_q", block_q), ("block_k", block_k)):
        if block <= 0 or block % _LANES:
            raise ValueError(f"{name} must be a positive multiple of {_LANES} (TPU lane tiling: q rows are the lanes "
                             f"of lse/di and of the transposed dK/dV logits); got {block}")


def _pad_seq(x, length, xp, axis=1):
    extra = length - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return xp.pad(x, widths)


def _pad_meta(meta: TokenMeta, length, xp=jnp) -> TokenMeta:
    # Zero padding: segment 0 marks the padding tokens, which attend nothing and are seen by nothing.
    return TokenMeta(*(_pad_seq(xp.asarray(a, xp.int32), length, xp) for a in meta))


def _meta_rows(meta: TokenMeta):
    """[B, S] fields -> [8, B*S] int32 (rows: position, segment, span, then zeros)."""
    rows = jnp.stack([jnp.asarray(a, jnp.int32).reshape(-1) for a in meta])
    return jnp.pad(rows, ((0, _META_ROWS - 3), (0, 0)))


def blocks_for(sq: int, sk: int, head_dim: int, block_q=None, block_k=None, generation=None) -> tuple[int, int]:
    """The (block_q, block_k) flash_attention uses: the given ones, else the generation's defaults shrunk to the
    padded lengths (a 300-token query runs one 384-row block, not a 512-row one)."""
    dq, dk = default_blocks(head_dim, generation)
    bq = block_q if block_q is not None else min(dq, _round_up(sq, _LANES))
    bk = block_k if block_k is not None else min(dk, _round_up(sk, _LANES))
    _check_blocks(bq, bk)
    return bq, bk


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
    generation: str | None = None,
):
    """Block-sparse flash attention on TPU. q [B, Sq, Hq, D], k/v [B, Sk, Hkv, D] -> [B, Sq, Hq, D].

    The mask is the rule of kernels.meta applied to q_meta and k_meta ([B, Sq] and [B, Sk] int32). Differentiable
    (custom_vjp with Pallas dQ and dK/dV kernels). block_q and block_k are multiples of 128; defaults per TPU
    generation and head dim (``default_blocks``; ``generation`` overrides the running one, e.g. when compiling for a
    target from CPU), shrunk to short sequences. ``interpret=True`` runs the kernels on CPU in TPU interpret mode.
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
    block_q, block_k = blocks_for(sq, sk, d, block_q, block_k, generation)
    prep = _prepare(q, k, v, q_meta, k_meta, block_q, block_k, scale, window, softcap, span_isolated, interpret)
    static, arrays = _split_plan(prep.plan)
    out = _flash(prep.cfg, static, prep.q, prep.k, prep.v, prep.qm, prep.km, arrays)
    return prep.ungroup(out)


class _Prepared(NamedTuple):
    cfg: _Config
    plan: TilePlan
    q: object  # [Hkv, G, B*Sq', D]
    k: object  # [Hkv, B*Sk', D]
    v: object
    qm: object  # [8, B*Sq']
    km: object
    grouped: object  # [B, Sq, Hq, X] -> [Hkv, G, B*Sq', X] (padded)
    ungroup: object  # the inverse, trimmed to Sq
    rows: object  # [B, Hq, Sq] -> [Hkv, G, B*Sq'] (padded)
    unrows: object  # the inverse, trimmed


def _prepare(q, k, v, q_meta, k_meta, block_q, block_k, scale, window, softcap, span_isolated, interpret):
    """The kernels' layout (padded, grouped, batch folded), their tile plan and configuration, and the maps
    between the public layouts and the kernels'."""
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    sq_pad, sk_pad = _round_up(sq, block_q), _round_up(sk, block_k)
    plan = tile_plan(q_meta, k_meta, block_q, block_k, window=window, span_isolated=span_isolated)
    group = hq // hkv

    def grouped(x, length=sq_pad, heads_per_kv=group):  # [B, S, H, X] -> [Hkv, heads_per_kv, B*S, X]
        x = _pad_seq(x, length, jnp).reshape(b, length, hkv, heads_per_kv, x.shape[-1])
        return jnp.transpose(x, (2, 3, 0, 1, 4)).reshape(hkv, heads_per_kv, b * length, x.shape[-1])

    def ungroup(x, length=sq_pad, heads_per_kv=group, keep=sq):
        x = jnp.transpose(x.reshape(hkv, heads_per_kv, b, length, x.shape[-1]), (2, 3, 0, 1, 4))
        return x.reshape(b, length, hkv * heads_per_kv, x.shape[-1])[:, :keep]

    def rows(x):  # [B, Hq, Sq] -> [Hkv, G, B*Sq']
        x = _pad_seq(x, sq_pad, jnp, axis=2).reshape(b, hkv, group, sq_pad)
        return jnp.transpose(x, (1, 2, 0, 3)).reshape(hkv, group, b * sq_pad)

    def unrows(x):
        x = jnp.transpose(x.reshape(hkv, group, b, sq_pad), (2, 0, 1, 3))
        return x.reshape(b, hq, sq_pad)[:, :, :sq]

    cfg = _Config(**config_fields(block_q, block_k, d, scale, window, softcap, span_isolated), group=group,
                  interpret=bool(interpret), n_q=sq_pad // block_q, n_k=sk_pad // block_k)
    return _Prepared(cfg, plan, grouped(q), grouped(k, sk_pad, 1)[:, 0], grouped(v, sk_pad, 1)[:, 0],
                     _meta_rows(_pad_meta(q_meta, sq_pad)), _meta_rows(_pad_meta(k_meta, sk_pad)), grouped,
                     ungroup, rows, unrows)


def _block_prepare(q, k, v, q_meta, k_meta, block_q, block_k, scale, window, softcap, span_isolated, interpret,
                   generation):
    check_gqa(q.shape[2], k.shape[2])
    block_q, block_k = blocks_for(q.shape[1], k.shape[1], q.shape[3], block_q, block_k, generation)
    return _prepare(q, k, v, TokenMeta(*q_meta), TokenMeta(*k_meta), block_q, block_k, scale, window, softcap,
                    span_isolated, interpret)


def flash_attention_fwd_block(q, k, v, q_meta: TokenMeta, k_meta: TokenMeta, *, block_q=None, block_k=None,
                              scale=None, window=None, softcap=None, span_isolated=False, interpret=False,
                              generation=None, with_steps=False):
    """The forward of one q shard against one K/V shard, for callers that own the vjp (ring attention); the
    conventions of kernels.tiled.tiled_attention_fwd_block: (out [B, Sq, Hq, D] float32, normalised over this K/V
    shard only; lse [B, Hq, Sq] float32, -inf for rows that see nothing here). Only the live tiles are stepped.
    ``with_steps``: also the grid steps per kv head this call's kernels run (the sum of the grid bounds of its
    scalar-prefetched tile lists: one step per live tile; int32, traced with traced metadata)."""
    prep = _block_prepare(q, k, v, q_meta, k_meta, block_q, block_k, scale, window, softcap, span_isolated,
                          interpret, generation)
    out, lse = _fwd(prep.q, prep.k, prep.v, prep.qm, prep.km, prep.plan, prep.cfg, out_dtype=jnp.float32)
    lse = prep.unrows(lse)
    result = prep.ungroup(out), jnp.where(lse >= _EMPTY_LSE, -jnp.inf, lse)
    return (*result, jnp.asarray(plan_steps(prep.plan)["fwd"], jnp.int32)) if with_steps else result


def flash_attention_bwd_block(q, k, v, q_meta: TokenMeta, k_meta: TokenMeta, d_out, lse, delta, *, block_q=None,
                              block_k=None, scale=None, window=None, softcap=None, span_isolated=False,
                              interpret=False, generation=None):
    """(dq [B, Sq, Hq, D], dk, dv [B, Sk, Hkv, D]) float32 of one q shard against one K/V shard, given the lse
    merged over every K/V shard ([B, Hq, Sq], -inf where nothing is seen) and delta = sum(d_out * out) [B, Hq, Sq]:
    the conventions of kernels.tiled.tiled_attention_bwd_block."""
    prep = _block_prepare(q, k, v, q_meta, k_meta, block_q, block_k, scale, window, softcap, span_isolated,
                          interpret, generation)
    lse_rows = prep.rows(jnp.where(jnp.isfinite(lse), lse, _EMPTY_LSE).astype(jnp.float32))
    di = prep.rows(delta.astype(jnp.float32))
    do = prep.grouped(d_out.astype(q.dtype))
    dq = _dq(prep.q, prep.k, prep.v, do, lse_rows, di, prep.qm, prep.km, prep.plan, prep.cfg, jnp.float32)
    dk, dv = _dkv(prep.q, prep.k, prep.v, do, lse_rows, di, prep.qm, prep.km, prep.plan, prep.cfg, jnp.float32)
    sk = k.shape[1]
    sk_pad = prep.k.shape[1] // q.shape[0]
    to_kv = lambda x: prep.ungroup(x[:, None], sk_pad, 1, sk)  # noqa: E731
    return prep.ungroup(dq), to_kv(dk), to_kv(dv)
