"""Token-workload-balanced context parallelism: the host-side token planner and the batch permutation.

A plan cuts every sequence of a [B, S] batch into row blocks of ``block`` tokens and gives each block to one of ``cp``
context ranks. Rank r then holds the slots [r * S' / cp, (r + 1) * S' / cp) of the permuted sequence, where S' >= S is
the padded length; padding slots hold -1 (segment 0: they attend nothing and nothing attends them).

Work per block (DESIGN.md, 'Context parallelism'):
- attention: the number of non-empty ``tile_q`` x ``tile_k`` tiles of its rows against every key of its sequence
  (by default ``block`` x 32: Cornstarch's 128 x 32 tiles; data.context_batches passes the attention kernel's own
  tile on the run's platform), counted exactly from the metadata;
- linear layers (projections, MLP): its number of real tokens.
Tile counts do not depend on the permutation when the tiles divide the block (they move whole), so a plan is costed
once, before assignment. A kernel tile larger than the block is made of pieces of several blocks: then the plan
assigns on the gcd tile and counts the kernel's tiles on the permuted shards (``plan``, ``_kernel_rank_tiles``).

Modes:
- ``uniform``: contiguous chunks;
- ``zigzag``: 2 * cp chunks, rank r gets chunks r and 2cp - 1 - r (balances plain causal masks only);
- ``lpt``: Cornstarch's makespan-min: blocks weighted by non-empty tiles summed over the batch, longest first to the
  least-loaded rank (ties to the lowest rank), each rank's blocks then in ascending order. Ranks may get different
  token counts; the static shard length is then the largest rank's, the others padded;
- ``balanced`` (ours, default): cost = alpha * tiles + beta * tokens from a FLOP cost model (cost_model.CostModel),
  the same number of blocks per rank and per sequence (static shards, no token imbalance), built by
  capacity-constrained LPT rounds and refined by cost-reducing swaps between the most loaded rank and the others
  toward the lower bound total / cp.

Lengths: S is padded up to a multiple of cp * block (2 * cp * block for zigzag) with padding blocks; a ragged last
block is padded inside. Labels must be shifted on the host *before* ``permute_batch`` (next-token targets are defined
in the original order; after permutation neighbours are unrelated tokens).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from mllm_jax.kernels.meta import SKIP, BlockStats, TokenMeta, block_stats, classify, merge_stats
from mllm_jax.parallel.cost_model import CostModel

MODES = ("uniform", "zigzag", "lpt", "balanced")
METHODS = ("allgather", "ring")  # kernels.context_parallel's methods: the keys a rank's q shard is tiled against
# Tile pairs the kernel-tile refinement may recount in all (~20 ns each on one core: ~20 ms).
REFINE_TILE_PAIRS = 1 << 20
_SHIFT = np.int64(2**31)  # positions and ids are < 2**30 (kernels.meta), so (id, value) pairs pack into one int64

# ContextConfig.block = "auto" (``auto_block``): blocks tried from the kernel tile down to this many tokens, and the
# padding a larger block may add beyond the least any candidate pads to (a fraction of S).
AUTO_MIN_BLOCK = 16
AUTO_EXTRA_PADDING = 1 / 32


@dataclass(frozen=True)
class ContextPlan:
    """The result of ``plan``. Arrays are numpy.

    permutation: int32 [B, S'], the original token index at each slot, -1 for padding slots.
    block_owner: int32 [B, nb] the rank holding each original block.
    rank_tiles, rank_tokens: [cp] non-empty tiles and real tokens per rank (summed over the batch).
    rank_cost: float64 [cp] = alpha * rank_tiles + beta * rank_tokens (the same cost model for every mode, so modes
    compare on one scale; lpt *chooses* by tiles alone, as Cornstarch does).
    """

    permutation: np.ndarray
    block_owner: np.ndarray
    rank_tiles: np.ndarray
    rank_tokens: np.ndarray
    rank_cost: np.ndarray
    mode: str
    cp: int
    block: int
    tile_k: int
    seq_len: int
    alpha: float
    beta: float
    tile_q: int = 0  # rows of the counted tiles (0: block)
    method: str = "allgather"  # the keys a rank's tiles were counted against when a tile does not divide the block

    @property
    def padded_len(self) -> int:
        return int(self.permutation.shape[1])

    @property
    def shard_len(self) -> int:
        return self.padded_len // self.cp

    @property
    def lower_bound(self) -> float:
        return float(self.rank_cost.sum()) / self.cp

    def imbalance(self, which: str = "cost") -> float:
        """max / mean over ranks of 'cost' (combined), 'tiles' or 'tokens'; 1.0 is perfect."""
        x = {"cost": self.rank_cost, "tiles": self.rank_tiles, "tokens": self.rank_tokens}[which].astype(np.float64)
        return float(x.max() / x.mean()) if x.sum() > 0 else 1.0

    def inverse(self) -> np.ndarray:
        """int32 [B, S]: the slot of every original token (the inverse permutation, to un-permute outputs)."""
        b, sp = self.permutation.shape
        inv = np.full((b, self.seq_len), -1, np.int32)
        rows, slots = np.nonzero(self.permutation >= 0)
        inv[rows, self.permutation[rows, slots]] = slots
        return inv

    def permute_meta(self, meta: TokenMeta) -> TokenMeta:
        return TokenMeta(*(np.asarray(a) for a in meta)).take(self.permutation, xp=np)


# ---------------------------------------------------------------------------------------------- lengths and blocks


def padded_length(seq_len: int, cp: int, mode: str, block: int) -> int:
    """S': ``seq_len`` padded to a multiple of cp x block (2 x cp x block for zigzag). For ``lpt`` the least it can
    be (its ranks may hold different block counts, the shards then padded to the largest: batch-dependent)."""
    unit = (2 * cp if mode == "zigzag" else cp) * block
    return -(-seq_len // unit) * unit


def auto_block(seq_len: int, cp: int, mode: str, tile_q: int, tile_k: int) -> int:
    """The planner block ``ContextConfig.block = "auto"`` means: a pure function of the static config, so every host
    and a compile for a target derive the same padded length.

    Candidates: the smallest block both sides of the kernel's ``tile_q`` x ``tile_k`` tile divide (their lcm, as a
    power of two at most: then the kernel's tiles move whole with the blocks and are never made of blocks from far
    apart, the 17-19 % lighter largest rank of benchmarks/RESULTS.md), halved down to AUTO_MIN_BLOCK. The largest
    whose padded length exceeds the least any candidate pads to by at most AUTO_EXTRA_PADDING x S: long sequences
    keep the kernel's tile, short or ragged ones the small block that pads least. The 8K-32K families of
    benchmarks/cp_balance.py check it for ``balanced``, ``zigzag`` and ``uniform``; ``lpt`` (greedy, uneven block
    counts) is not monotone in the block either way."""
    for name, val in (("seq_len", seq_len), ("cp", cp), ("tile_q", tile_q), ("tile_k", tile_k)):
        if not isinstance(val, (int, np.integer)) or val < 1:
            raise ValueError(f"auto_block: {name} must be a positive integer; got {val!r}")
    if mode not in MODES:
        raise ValueError(f"auto_block: mode must be one of {MODES}; got {mode!r}")
    top = 1 << (math.lcm(int(tile_q), int(tile_k)).bit_length() - 1)  # largest power of two <= lcm
    candidates = [top >> i for i in range(top.bit_length()) if (top >> i) >= min(AUTO_MIN_BLOCK, top)]
    lengths = [padded_length(seq_len, cp, mode, b) for b in candidates]
    limit = min(lengths) + seq_len * AUTO_EXTRA_PADDING
    return next(b for b, n in zip(candidates, lengths) if n <= limit)


# --------------------------------------------------------------------------------------------- exact tile counting


def _group_reduce(keys, vals, reducer):
    """Unique keys (sorted) and the reduction of vals over each key."""
    if keys.size == 0:
        return keys, vals
    order = np.argsort(keys, kind="stable")
    k, v = keys[order], vals[order]
    first = np.empty(k.shape[0], bool)
    first[0] = True
    np.not_equal(k[1:], k[:-1], out=first[1:])
    idx = np.flatnonzero(first)
    return k[idx], reducer.reduceat(v, idx)


def _run_starts(*levels):
    """Indices where any of the flat arrays changes value (the starts of maximal runs)."""
    change = np.zeros(levels[0].shape[0], bool)
    change[0] = True
    for a in levels:
        change[1:] |= a[1:] != a[:-1]
    return np.flatnonzero(change)


def _entries(pos, code, span, unit):
    """Summaries of the units (row blocks or key chunks, ``unit`` tokens each) of a flat token stream.

    Returns (keys, max_pos, min_pos, span_keys): keys = unit * 2**31 + segment code (sorted, unique) with the max/min
    position of that segment's tokens in the unit, and span_keys = (unit, segment code, span) for nonzero spans.
    Works on runs of equal values, so it costs O(tokens) plus a sort of the (few) runs.
    """
    unit_id = np.arange(code.shape[0], dtype=np.int64) // unit
    run_key = unit_id * _SHIFT + code
    starts = _run_starts(run_key)
    pmax = np.maximum.reduceat(pos, starts)
    pmin = np.minimum.reduceat(pos, starts)
    keep = code[starts] != 0
    keys, seg_max = _group_reduce(run_key[starts][keep], pmax[keep], np.maximum)
    _, seg_min = _group_reduce(run_key[starts][keep], pmin[keep], np.minimum)
    sp = _run_starts(run_key, span)
    sp = sp[(span[sp] != 0) & (code[sp] != 0)]
    return keys, seg_max, seg_min, (unit_id[sp], code[sp], span[sp])


def block_costs(meta: TokenMeta, block: int = 128, tile_k: int = 32, tile_q: int | None = None):
    """Exact non-empty ``tile_q`` x ``tile_k`` tile counts (``tile_q`` defaults to ``block``; both must divide it, so
    tiles move whole with their block) and real-token counts per row block, int64 [B, nb] each.

    A tile is non-empty iff some query of the block attends some key of the chunk under the kernels.meta rule (no
    window, not span-isolated). Linear in the number of tokens: row blocks and key chunks are summarised by their
    (segment, max or min position) and (segment, span) entries; key chunks holding one segment and at most one span
    (almost all) are counted per row by binary search, the rest by an explicit pair set.
    """
    pos = np.asarray(meta.positions)
    seg = np.asarray(meta.segment_ids)
    span = np.asarray(meta.span_ids)
    b, s = seg.shape
    tq = block if tile_q is None else tile_q
    if block % tq or block % tile_k:
        raise ValueError(f"block ({block}) must be a multiple of tile_q ({tq}) and tile_k ({tile_k})")
    nb = -(-s // block)
    nq = nb * (block // tq)  # row units of tile_q rows (summed into their block at the end)
    nk = nb * (block // tile_k)
    pad = nb * block - s
    if pad:
        z = np.zeros((b, pad), np.int32)
        pos, seg, span = (np.concatenate([a, z], axis=1) for a in (pos, seg, span))
    pos = pos.astype(np.int64).ravel()
    seg_flat = seg.astype(np.int64).ravel()
    span = span.astype(np.int64).ravel()
    tokens = (seg != 0).reshape(b, nb, block).sum(-1).astype(np.int64)
    # A dense 1-based code per (sequence, segment), 0 = padding, so sequences never match each other.
    batch_of = np.repeat(np.arange(b, dtype=np.int64), nb * block)
    top = int(seg_flat.max(initial=0)) + 1
    if b * top < _SHIFT:
        code = np.where(seg_flat != 0, batch_of * top + seg_flat, 0)
    else:
        _, inv = np.unique(np.where(seg_flat != 0, batch_of * _SHIFT + seg_flat, -1), return_inverse=True)
        code = np.where(seg_flat != 0, inv.astype(np.int64) + 1, 0)
    q_keys, q_pmax, _, (qs_unit, qs_seg, qs_span) = _entries(pos, code, span, tq)
    k_keys, _, k_pmin, (ks_unit, ks_seg, ks_span) = _entries(pos, code, span, tile_k)
    q_row, q_seg = q_keys // _SHIFT, q_keys % _SHIFT
    k_col, k_seg = k_keys // _SHIFT, k_keys % _SHIFT

    # Dense ids for (segment, span) pairs, shared by both sides.
    sp_codes = np.unique(np.concatenate([qs_seg * _SHIFT + qs_span, ks_seg * _SHIFT + ks_span]))
    q_pid = np.searchsorted(sp_codes, qs_seg * _SHIFT + qs_span).astype(np.int64)
    k_pid = np.searchsorted(sp_codes, ks_seg * _SHIFT + ks_span).astype(np.int64)
    # Dedupe (chunk, span) and (row, span) pairs (a span can recur within a unit only if interrupted).
    qsp = np.unique(qs_unit * _SHIFT + q_pid)
    q_sp_row, q_sp_pid = qsp // _SHIFT, qsp % _SHIFT
    ksp = np.unique(ks_unit * _SHIFT + k_pid)
    k_sp_col, k_sp_pid = ksp // _SHIFT, ksp % _SHIFT

    n_seg_per_col = np.bincount(k_col, minlength=b * nk)
    n_sp_per_col = np.bincount(k_sp_col, minlength=b * nk)
    simple_col = (n_seg_per_col == 1) & (n_sp_per_col <= 1)

    # The max query position of a row's segment, looked up for each (row, span) entry.
    q_rowseg = q_row * _SHIFT + q_seg  # sorted (from _group_reduce)
    q_sp_seg = sp_codes[q_sp_pid] // _SHIFT
    p_of_sp = q_pmax[np.searchsorted(q_rowseg, q_sp_row * _SHIFT + q_sp_seg)]

    counts = np.zeros(b * nq, np.int64)
    # Simple chunks: one (segment, min position) and optionally one span each.
    simple_seg = simple_col[k_col]
    c_seg, c_min = k_seg[simple_seg], k_pmin[simple_seg]
    causal_sorted = np.sort(c_seg * _SHIFT + c_min)
    hi = np.searchsorted(causal_sorted, q_seg * _SHIFT + q_pmax, side="right")
    lo = np.searchsorted(causal_sorted, q_seg * _SHIFT, side="left")
    counts += np.bincount(q_row, weights=hi - lo, minlength=b * nq).astype(np.int64)
    # ... plus the span chunks of a row's span that its causal reach misses (min position beyond the row's max).
    col_min = np.zeros(b * nk, np.int64)
    col_min[k_col[simple_seg]] = c_min
    simple_sp = simple_col[k_sp_col]
    span_sorted = np.sort(k_sp_pid[simple_sp] * _SHIFT + col_min[k_sp_col[simple_sp]])
    hi = np.searchsorted(span_sorted, (q_sp_pid + 1) * _SHIFT, side="left")
    lo = np.searchsorted(span_sorted, q_sp_pid * _SHIFT + p_of_sp, side="right")
    counts += np.bincount(q_sp_row, weights=hi - lo, minlength=b * nq).astype(np.int64)

    # Other chunks (several segments or spans: boundaries): mark every (row, chunk) pair reached, then count.
    cx_cols = np.flatnonzero(~simple_col & (n_seg_per_col > 0))
    if cx_cols.size:
        cx_index = np.full(b * nk, -1, np.int64)
        cx_index[cx_cols] = np.arange(cx_cols.size)
        hit = np.zeros((b * nq, cx_cols.size), bool)
        # Causal: rows of the same segment whose max position reaches the chunk's min position.
        q_order = np.argsort(q_seg * _SHIFT + q_pmax, kind="stable")
        q_sorted = (q_seg * _SHIFT + q_pmax)[q_order]
        sel = cx_index[k_col] >= 0
        lo = np.searchsorted(q_sorted, k_seg[sel] * _SHIFT + k_pmin[sel], side="left")
        hi = np.searchsorted(q_sorted, (k_seg[sel] + 1) * _SHIFT, side="left")
        _mark(hit, q_row[q_order], lo, hi, cx_index[k_col[sel]])
        # Spans: rows holding the same span.
        sp_order = np.argsort(q_sp_pid, kind="stable")
        sp_sorted = q_sp_pid[sp_order]
        sel = cx_index[k_sp_col] >= 0
        lo = np.searchsorted(sp_sorted, k_sp_pid[sel], side="left")
        hi = np.searchsorted(sp_sorted, k_sp_pid[sel], side="right")
        _mark(hit, q_sp_row[sp_order], lo, hi, cx_index[k_sp_col[sel]])
        counts += hit.sum(1)
    return counts.reshape(b, nb, block // tq).sum(-1), tokens


def _mark(hit, rows_sorted, lo, hi, cols):
    """hit[rows_sorted[lo[e]:hi[e]], cols[e]] = True for every entry e, without a Python loop."""
    length = np.maximum(hi - lo, 0)
    total = int(length.sum())
    if total == 0:
        return
    offsets = np.repeat(lo - np.cumsum(length) + length, length) + np.arange(total)
    hit[rows_sorted[offsets], np.repeat(cols, length)] = True


# ----------------------------------------------------------------------------------------------------- assignment


def _assign_uniform(n_blocks: int, cp: int) -> np.ndarray:
    return np.repeat(np.arange(cp, dtype=np.int32), n_blocks // cp)


def _assign_zigzag(n_blocks: int, cp: int) -> np.ndarray:
    chunk = np.repeat(np.arange(2 * cp), n_blocks // (2 * cp))
    return np.where(chunk < cp, chunk, 2 * cp - 1 - chunk).astype(np.int32)


def _assign_lpt(weight: np.ndarray, cp: int) -> np.ndarray:
    """Cornstarch's makespan-min: heaviest block first (ties: lower index) to the least-loaded rank (ties: lower rank).

    A Python loop over blocks (about a microsecond each): 1024 blocks for 128K tokens."""
    owner = np.empty(weight.shape[0], np.int32)
    load = [0.0] * cp
    for i in np.argsort(-weight, kind="stable").tolist():
        r = load.index(min(load))
        owner[i] = r
        load[r] += float(weight[i])
    return owner


def _assign_balanced(cost: np.ndarray, cp: int, max_swaps: int) -> np.ndarray:
    """Equal blocks per rank in every sequence, then swaps toward total / cp. cost: [B, n] (n a multiple of cp)."""
    b, n = cost.shape
    per = n // cp
    owner = np.empty((b, n), np.int32)
    # Capacity-constrained LPT: each sequence's blocks, heaviest first, form rounds of cp; rounds (heaviest first over
    # the whole batch) hand their blocks, heaviest first, to the ranks in increasing order of load.
    order = np.argsort(-cost, axis=1, kind="stable").reshape(b, per, cp)
    round_lead = cost[np.arange(b)[:, None], order[:, :, 0]]
    load = np.zeros(cp)
    for flat in np.argsort(-round_lead, axis=None, kind="stable").tolist():
        seq, k = divmod(flat, per)
        ranks = np.argsort(load, kind="stable")
        blocks = order[seq, k]
        owner[seq, blocks] = ranks
        load[ranks] += cost[seq, blocks]
    # Refinement: swap one block of the most loaded rank with one of the same sequence on a lighter rank, choosing the
    # pair that lowers the larger of the two loads most; stop at the bound or when no swap helps.
    target = cost.sum() / cp
    seq_of = np.repeat(np.arange(b), n).reshape(b, n)
    flat_cost, flat_owner, flat_seq = cost.ravel(), owner.ravel(), seq_of.ravel()
    for _ in range(max_swaps):
        hi = int(np.argmax(load))
        if load[hi] <= target * (1 + 1e-9):
            break
        mine = np.flatnonzero(flat_owner == hi)
        best = None
        for lo in np.argsort(load, kind="stable").tolist():
            gap = load[hi] - load[lo]
            if lo == hi or gap <= 0:
                break
            theirs = np.flatnonzero(flat_owner == lo)
            d = flat_cost[mine][:, None] - flat_cost[theirs][None, :]
            ok = (d > 0) & (d < gap) & (flat_seq[mine][:, None] == flat_seq[theirs][None, :])
            if not ok.any():
                continue
            new_max = np.where(ok, np.maximum(load[hi] - d, load[lo] + d), np.inf)
            a, c = np.unravel_index(np.argmin(new_max), new_max.shape)
            best = (lo, mine[a], theirs[c], d[a, c])
            break
        if best is None:
            break
        lo, a, c, d = best
        flat_owner[a], flat_owner[c] = lo, hi
        load[hi] -= d
        load[lo] += d
    return flat_owner.reshape(b, n)


def _block_slots(owner: np.ndarray, cp: int, shard_blocks: int) -> np.ndarray:
    """int64 [B, cp * shard_blocks]: the original block at every slot block (each rank's blocks ascending, then -1
    padding), from block owners [B, n]."""
    b, n = owner.shape
    order = np.argsort(owner.astype(np.int64) * n + np.arange(n), axis=1, kind="stable")
    sorted_owner = np.take_along_axis(owner, order, axis=1)
    counts = np.stack([np.bincount(o, minlength=cp) for o in owner])
    start = np.concatenate([np.zeros((b, 1), np.int64), np.cumsum(counts, axis=1)[:, :-1]], axis=1)
    rank_index = np.arange(n)[None, :] - np.take_along_axis(start, sorted_owner, axis=1)
    slot = sorted_owner * shard_blocks + rank_index
    block_at = np.full((b, cp * shard_blocks), -1, np.int64)
    np.put_along_axis(block_at, slot, order, axis=1)
    return block_at


def _permutation(owner: np.ndarray, cp: int, block: int, seq_len: int, shard_blocks: int) -> np.ndarray:
    """Slots [B, cp * shard_blocks * block] from block owners [B, n]: each rank's blocks ascending, then -1 padding."""
    b = owner.shape[0]
    block_at = _block_slots(owner, cp, shard_blocks)
    tok = block_at[:, :, None] * block + np.arange(block)
    tok = np.where((block_at[:, :, None] >= 0) & (tok < seq_len), tok, -1)
    return tok.reshape(b, -1).astype(np.int32)


# ------------------------------------------------------------------------------- kernel tiles of a permuted shard
#
# When the kernel's tile does not divide the block, its tiles are made of several blocks (or pieces of blocks) that
# the permutation brings together, so what it computes depends on the assignment, not on per-block sums. The
# sequence is cut once into pieces of ``unit`` = gcd(block, tile_q, tile_k) tokens (each inside one block, so it
# moves whole) and summarised (kernels.meta.block_stats); a permuted tile's summary is the merge of its pieces'
# (kernels.meta.merge_stats), classified by the kernels' own rule (kernels.meta.classify). Cost: O(S / unit) for the
# merges plus one entry per (q tile, k tile) pair.


def _piece_stats(arrays, n_blocks: int, block: int, unit: int) -> BlockStats:
    """block_stats [B, n_blocks * block / unit + 1] of the ``unit``-token pieces of the sequence padded to
    ``n_blocks`` blocks, the last entry an all-padding piece (what padding slots hold)."""
    b, s = arrays[0].shape
    padded = [np.pad(a, ((0, 0), (0, n_blocks * block - s))) for a in arrays]
    pieces = block_stats(TokenMeta(*padded), unit, xp=np)
    empty = block_stats(TokenMeta(*(np.zeros((b, unit), np.int32),) * 3), unit, xp=np)
    return BlockStats(*(np.concatenate([p, e], axis=1) for p, e in zip(pieces, empty)))


def _kernel_rank_tiles(pieces: BlockStats, rows: np.ndarray, block_at: np.ndarray, cp: int, block: int, tile_q: int,
                       tile_k: int, unit: int, method: str) -> np.ndarray:
    """int64 [R, cp]: live (non-skipped) ``tile_q`` x ``tile_k`` tiles of each rank for R block layouts ``block_at``
    [R, cp * shard_blocks] of batch rows ``rows`` [R]: the rank's shard (padded to whole q tiles with padding
    tokens, as the kernels pad) against every key of the permuted sequence ("allgather") or against each rank's shard
    ("ring": the ring's shard pairs), the tiles the kernels' block map keeps."""
    n_r = block_at.shape[0]
    per_block = block // unit
    empty = pieces.seg_min.shape[1] - 1
    idx = np.where(block_at[:, :, None] >= 0, block_at[:, :, None] * per_block + np.arange(per_block), empty)
    idx = idx.reshape(n_r, cp, -1)  # [R, cp, pieces per shard]

    def tiles(idx_rgp, width):  # [R, groups, pieces] -> stats [R, groups * tiles] of ``width`` pieces each
        groups, n_p = idx_rgp.shape[1:]
        m = -(-n_p // width)
        idx_rgp = np.pad(idx_rgp, ((0, 0), (0, 0), (0, m * width - n_p)), constant_values=empty)
        idx_rtw = idx_rgp.reshape(n_r, groups * m, width)
        return merge_stats(BlockStats(*(a[rows[:, None, None], idx_rtw] for a in pieces)))

    q = tiles(idx, tile_q // unit)
    k = tiles(idx.reshape(n_r, 1, -1) if method == "allgather" else idx, tile_k // unit)
    live = classify(q, k, xp=np) != SKIP  # [R, cp * q tiles per rank, k tiles]
    return live.sum(-1).reshape(n_r, cp, -1).sum(-1).astype(np.int64)


def _rank_sums(owner: np.ndarray, values: np.ndarray, cp: int) -> np.ndarray:
    """[R, cp]: per layout row, the sum of ``values`` [R, n] over the blocks each rank owns."""
    n_r = owner.shape[0]
    flat = (np.arange(n_r)[:, None] * cp + owner).ravel()
    return np.bincount(flat, weights=values.ravel(), minlength=n_r * cp).reshape(n_r, cp)


def _refine_on_kernel_tiles(owner, proxy_cost, tokens, count, alpha, beta, cp, rounds, candidates):
    """Swaps of two blocks of one sequence between the most loaded rank and another, judged on the kernel's real
    tiles: each round the ``candidates`` swaps the proxy cost (``proxy_cost`` [B, n]: tiles of the gcd tile) ranks
    best are recounted exactly (``count(owners [R, n], rows [R]) -> tiles [R, cp]``), and the one that lowers the
    largest rank load (alpha * kernel tiles + beta * tokens) most is kept; stops when none lowers it.
    Returns (owner, kernel tiles [B, cp])."""
    b, n = owner.shape
    owner = owner.copy()
    tiles = count(owner, np.arange(b))
    row_load = alpha * tiles + beta * _rank_sums(owner, tokens, cp)
    load = row_load.sum(0)
    seq_of = np.repeat(np.arange(b), n)
    for _ in range(rounds):
        hi = int(np.argmax(load))
        flat_owner, flat_cost = owner.ravel(), proxy_cost.ravel()
        mine, theirs = np.flatnonzero(flat_owner == hi), np.flatnonzero(flat_owner != hi)
        d = flat_cost[mine][:, None] - flat_cost[theirs][None, :]
        lo_load = load[flat_owner[theirs]][None, :]
        predicted = np.maximum(load[hi] - d, lo_load + d)
        ok = (seq_of[mine][:, None] == seq_of[theirs][None, :]) & (predicted < load[hi])
        if not ok.any():
            break
        pick = np.argsort(np.where(ok, predicted, np.inf), axis=None, kind="stable")[:candidates]
        pick = pick[ok.ravel()[pick]]
        a, c = mine[pick // theirs.size], theirs[pick % theirs.size]
        seqs = seq_of[a]
        trial = owner[seqs].copy()
        k = np.arange(pick.size)
        trial[k, a % n], trial[k, c % n] = flat_owner[c], hi
        t = count(trial, seqs)
        new_row = alpha * t + beta * _rank_sums(trial, tokens[seqs], cp)
        new_load = load[None] - row_load[seqs] + new_row
        best = int(np.argmin(new_load.max(1)))
        if new_load[best].max() >= load.max() * (1 - 1e-12):
            break
        s = seqs[best]
        owner[s], tiles[s], row_load[s], load = trial[best], t[best], new_row[best], new_load[best]
    return owner, tiles


# ----------------------------------------------------------------------------------------------------------- plan


def _check_meta(meta: TokenMeta) -> tuple[np.ndarray, ...]:
    arrays = tuple(np.asarray(a) for a in meta)
    shapes = [a.shape for a in arrays]
    if len(set(shapes)) != 1 or len(shapes[0]) != 2:
        raise ValueError(f"meta: positions, segment_ids, span_ids must be 2-D [B, S] of one shape; got {shapes}")
    if shapes[0][1] == 0:
        raise ValueError(f"meta: sequence length must be > 0; got shape {shapes[0]}")
    pos, seg, span = arrays
    real = seg != 0
    for name, a in (("positions", pos[real]), ("segment_ids", seg), ("span_ids", span[real])):
        if a.size and (a.min() < 0 or a.max() >= 2**30):
            raise ValueError(f"meta.{name} must lie in [0, 2**30) on real tokens; got range [{a.min()}, {a.max()}]")
    return arrays


def plan(
    meta: TokenMeta,
    cp: int,
    mode: str = "balanced",
    block: int = 128,
    *,
    tile_k: int = 32,
    tile_q: int | None = None,
    method: str = "allgather",
    cost_model: CostModel | None = None,
    alpha: float | None = None,
    beta: float | None = None,
    max_swaps: int = 1000,
    refine_rounds: int = 32,
    refine_candidates: int = 8,
    costs: tuple[np.ndarray, np.ndarray] | None = None,
) -> ContextPlan:
    """Distribute the row blocks of every sequence of ``meta`` (numpy [B, S]) over ``cp`` context ranks.

    ``alpha`` / ``beta`` (FLOPs per counted tile / per token) default to ``cost_model`` (CostModel() if None).
    S is padded to a multiple of cp * block (2 * cp * block for zigzag); see the module docstring.

    ``tile_q`` x ``tile_k``: the attention tile counted (``tile_q`` defaults to ``block``), normally the kernel's own
    (kernels.dispatch.kernel_tile; data.context_batches.permute_for_context passes it). The plan's ``rank_tiles`` are
    the live tiles that kernel computes on each rank's permuted shard, for any block:
    - both sides divide the block: tiles move whole with their blocks and are counted once, exactly, per block
      (``block_costs``; ``costs``: its result when already computed, planning several modes for one batch);
    - otherwise a kernel tile is made of pieces of several blocks: blocks are assigned on the tiles of
      gcd(block, tile) (``costs`` then holds those), the kernel's tiles are counted on the permuted shards
      (``method``: "allgather", a q shard against every key, or "ring", against each K/V shard), and ``balanced``
      then swaps blocks (``refine_rounds`` rounds of ``refine_candidates`` exactly recounted swaps) while that lowers
      the largest rank load of kernel tiles and tokens.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}; got {method!r}")
    if not isinstance(cp, (int, np.integer)) or cp < 1:
        raise ValueError(f"cp (context ranks) must be a positive integer; got {cp!r}")
    if isinstance(block, bool) or not isinstance(block, (int, np.integer)) or block < 1:
        raise ValueError(f"block must be a positive integer (ContextConfig.block 'auto' is resolved first, by "
                         f"data.context_batches.context_block); got {block!r}")
    tq = block if tile_q is None else tile_q
    if block < 1 or tile_k < 1 or tq < 1:
        raise ValueError(f"block ({block}), tile_q ({tq}) and tile_k ({tile_k}) must be positive")
    pos, seg, span = _check_meta(meta)
    # Tiles assigned per block: the kernel's when they divide the block, else the largest that do.
    bq, bk = math.gcd(block, tq), math.gcd(block, tile_k)
    aligned = (bq, bk) == (tq, tile_k)
    cm = cost_model or CostModel(tile_q=tq, tile_k=tile_k)
    alpha = cm.alpha if alpha is None else float(alpha)
    beta = cm.beta if beta is None else float(beta)
    alpha_block = alpha * (bq * bk) / (tq * tile_k)  # FLOPs of one assigned tile
    b, s = seg.shape
    tiles, tokens = costs if costs is not None else block_costs(TokenMeta(pos, seg, span), block, bk, bq)
    if tiles.shape != (b, -(-s // block)) or tokens.shape != tiles.shape:
        raise ValueError(f"costs must be two [B, nb] = {(b, -(-s // block))} arrays; got {tiles.shape}, {tokens.shape}")
    nb = tiles.shape[1]
    n = padded_length(nb, cp, mode, 1)  # blocks after padding
    pad = ((0, 0), (0, n - nb))
    tiles_p, tokens_p = np.pad(tiles, pad), np.pad(tokens, pad)
    if mode == "uniform":
        owner = np.broadcast_to(_assign_uniform(n, cp), (b, n))
    elif mode == "zigzag":
        owner = np.broadcast_to(_assign_zigzag(n, cp), (b, n))
    elif mode == "lpt":
        owner_real = _assign_lpt(tiles.sum(0).astype(np.float64), cp)
        owner = np.broadcast_to(owner_real, (b, nb))
    else:
        owner = _assign_balanced(alpha_block * tiles_p + beta * tokens_p, cp, max_swaps)
    owner = np.ascontiguousarray(owner, dtype=np.int32)
    counts = np.stack([np.bincount(o, minlength=cp) for o in owner])
    shard_blocks = int(counts.max())
    if aligned:
        rank_tiles = np.bincount(owner[:, :nb].ravel(), weights=tiles.ravel(), minlength=cp)
    else:
        piece = math.gcd(block, tq, tile_k)
        pieces = _piece_stats((pos, seg, span), owner.shape[1], block, piece)

        def count(owners, rows):
            return _kernel_rank_tiles(pieces, rows, _block_slots(owners, cp, shard_blocks), cp, block, tq, tile_k,
                                      piece, method)

        # Each refinement round recounts ``refine_candidates`` layouts of one sequence: bounded by a budget of tile
        # pairs, so small kernel tiles against small blocks (many pairs) refine less rather than slowly.
        shard_pieces = shard_blocks * block // piece
        q_tiles = cp * -(-shard_pieces // (tq // piece))
        k_tiles = (-(-cp * shard_pieces // (tile_k // piece)) if method == "allgather"
                   else cp * -(-shard_pieces // (tile_k // piece)))
        rounds = min(refine_rounds, REFINE_TILE_PAIRS // max(1, refine_candidates * q_tiles * k_tiles))
        if mode == "balanced" and rounds > 0:
            owner, row_tiles = _refine_on_kernel_tiles(owner, alpha_block * tiles_p + beta * tokens_p, tokens_p, count,
                                                       alpha, beta, cp, rounds, refine_candidates)
        else:
            row_tiles = count(owner, np.arange(b))
        rank_tiles = row_tiles.sum(0)
    own_real = owner[:, :nb]
    perm = _permutation(owner, cp, block, s, shard_blocks)
    rank_tokens = np.bincount(own_real.ravel(), weights=tokens.ravel(), minlength=cp)
    return ContextPlan(
        permutation=perm,
        block_owner=own_real,
        rank_tiles=rank_tiles.astype(np.int64),
        rank_tokens=rank_tokens.astype(np.int64),
        rank_cost=alpha * rank_tiles + beta * rank_tokens,
        mode=mode,
        cp=int(cp),
        block=block,
        tile_k=tile_k,
        seq_len=s,
        alpha=alpha,
        beta=beta,
        tile_q=tq,
        method=method,
    )


# ------------------------------------------------------------------------------------------------ batch permutation

# Fill values of padding slots per batch key; any other [B, S, ...] array gets 0. Segment 0 marks padding.
PAD_VALUES = {"input_ids": 0, "labels": -100, "positions": 0, "segment_ids": 0, "span_ids": 0}
_NOT_SEQUENCE = ("encoder_inputs",)


def _take(x, perm, fill):
    x = np.asarray(x)
    valid = perm >= 0
    idx = np.where(valid, perm, 0).reshape(perm.shape + (1,) * (x.ndim - 2))
    out = np.take_along_axis(x, np.broadcast_to(idx, perm.shape + x.shape[2:]), axis=1)
    return np.where(valid.reshape(idx.shape), out, np.asarray(fill, x.dtype))


def permute_batch(batch: dict, plan: ContextPlan, pad_values: dict | None = None) -> dict:
    """Apply ``plan.permutation`` to every [B, S, ...] array of a batch dict (numpy, host side).

    Padding slots get segment 0, label -100, feature_index -1 and 0 elsewhere (``pad_values`` overrides per key).
    ``labels`` must already hold next-token targets in the original order (shift before permuting). Encoder inputs
    ([N, ...] per modality) are not token-aligned and pass through unchanged.
    """
    fills = {**PAD_VALUES, **(pad_values or {})}
    b, s = plan.permutation.shape[0], plan.seq_len
    out = {}
    for key, value in batch.items():
        if key in _NOT_SEQUENCE:
            out[key] = value
        elif key == "feature_index":
            out[key] = {name: _take(_expect(f"feature_index[{name!r}]", a, b, s), plan.permutation, -1)
                        for name, a in value.items()}
        elif np.ndim(value) >= 2 and np.shape(value)[:2] == (b, s):
            out[key] = _take(value, plan.permutation, fills.get(key, 0))
        elif key in PAD_VALUES:
            _expect(key, value, b, s)
        else:
            out[key] = value
    return out


def _expect(name, a, b, s):
    if np.shape(a)[:2] != (b, s):
        raise ValueError(f"batch[{name}] must be [B, S] = [{b}, {s}] to match the plan; got shape {np.shape(a)}")
    return a


def unpermute(x, plan: ContextPlan):
    """[B, S', ...] in plan order -> [B, S, ...] in the original order (numpy or jax arrays)."""
    inv = plan.inverse()
    xp = np if isinstance(x, np.ndarray) else __import__("jax.numpy", fromlist=["numpy"])
    idx = inv.reshape(inv.shape + (1,) * (x.ndim - 2))
    return xp.take_along_axis(x, xp.broadcast_to(xp.asarray(idx), inv.shape + x.shape[2:]), axis=1)
