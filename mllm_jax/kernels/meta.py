"""Token metadata, the attention mask rule and the tile block map (docs/architecture.md, 'Token metadata and the
attention rule').

Per token: ``positions`` (global position inside its packed segment), ``segment_ids`` (packed sample, 0 = padding) and
``span_ids`` (0 for text, a unique id per encoder instance: an image, a frame group, an audio clip).

    q attends k  iff  seg_q == seg_k != 0  and  (pos_k <= pos_q  or  span_q == span_k != 0)

With ``window`` (Mistral/Gemma sliding window) the causal part also needs ``pos_q - pos_k < window``. With
``span_isolated`` (Cornstarch's semantics) a token inside a span attends only to its own span.

Everything here is written once against an array namespace ``xp`` (numpy on the host, jax.numpy on the device) so the
host planner and the kernels classify tiles identically.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

SKIP, PARTIAL, FULL = 0, 1, 2
_BIG = np.int32(2**30)  # sentinel larger than any id or position


class TokenMeta(NamedTuple):
    """int32 arrays [B, S] (numpy or jax). A NamedTuple, so it is a pytree and travels through jit/shard_map."""

    positions: object
    segment_ids: object
    span_ids: object

    @property
    def shape(self):
        return tuple(self.segment_ids.shape)

    def validate(self, name: str = "meta") -> "TokenMeta":
        shapes = {f: tuple(np.shape(getattr(self, f))) for f in self._fields}
        if len(set(shapes.values())) != 1:
            raise ValueError(f"{name}: positions, segment_ids and span_ids must share one shape [B, S]; got {shapes}")
        if len(self.shape) != 2:
            raise ValueError(f"{name}: metadata must be 2-D [B, S]; got shape {self.shape}")
        return self

    @classmethod
    def causal(cls, batch: int, length: int, xp=np) -> "TokenMeta":
        """Plain text: one segment per row, positions 0..S-1, no spans."""
        pos = xp.broadcast_to(xp.arange(length, dtype=xp.int32)[None], (batch, length))
        return cls(pos, xp.ones((batch, length), xp.int32), xp.zeros((batch, length), xp.int32))

    def take(self, index_BS, xp=np) -> "TokenMeta":
        """Gather tokens along the sequence (a permutation); index -1 gives a padding token (segment 0)."""
        valid = index_BS >= 0
        safe = xp.where(valid, index_BS, 0)

        def g(a):
            return xp.where(valid, xp.take_along_axis(a, safe, axis=1), 0).astype(xp.int32)

        return TokenMeta(g(self.positions), g(self.segment_ids), g(self.span_ids))


def _xp(*arrays):
    return np if all(isinstance(a, np.ndarray) for a in arrays) else jnp


def mask(q_meta: TokenMeta, k_meta: TokenMeta, *, window: int | None = None, span_isolated: bool = False):
    """Dense boolean mask [B, Sq, Sk] of the rule above. For references and tests, not for long sequences."""
    xp = _xp(*q_meta, *k_meta)
    pq, sq, spq = (a[:, :, None] for a in q_meta)
    pk, sk, spk = (a[:, None, :] for a in k_meta)
    same_seg = (sq == sk) & (sq != 0)
    causal = pk <= pq
    if window is not None:
        causal = causal & (pq - pk < window)
    same_span = (spq == spk) & (spq != 0)
    if span_isolated:
        visible = xp.where(spq != 0, same_span, causal | same_span)
    else:
        visible = causal | same_span
    return same_seg & visible


class BlockStats(NamedTuple):
    """Per-block summaries [B, n_blocks] over the non-padding tokens of each block."""

    seg_min: object  # _BIG when the block is all padding
    seg_max: object  # -1 when the block is all padding
    first_pos: object  # min position among tokens of segment seg_min
    last_pos: object  # max position among tokens of segment seg_max
    pos_min: object
    pos_max: object
    span_min: object  # over nonzero spans; _BIG if none
    span_max: object  # over nonzero spans; -1 if none
    has_pad: object  # any token with segment 0
    has_text: object  # any non-padding token with span 0


def _pad_to_blocks(a, block, xp):
    s = a.shape[1]
    n = -(-s // block)
    if n * block != s:
        a = xp.concatenate([a, xp.zeros((a.shape[0], n * block - s), a.dtype)], axis=1)
    return a.reshape(a.shape[0], n, block)


def block_stats(meta: TokenMeta, block: int, xp=None) -> BlockStats:
    """Summaries per block of ``block`` tokens; a ragged tail is padded with padding tokens (segment 0)."""
    xp = xp or _xp(*meta)
    pos = _pad_to_blocks(xp.asarray(meta.positions, dtype=xp.int32), block, xp)
    seg = _pad_to_blocks(xp.asarray(meta.segment_ids, dtype=xp.int32), block, xp)
    span = _pad_to_blocks(xp.asarray(meta.span_ids, dtype=xp.int32), block, xp)
    real = seg != 0
    big, neg = _BIG, np.int32(-1)
    seg_min = xp.min(xp.where(real, seg, big), axis=-1)
    seg_max = xp.max(xp.where(real, seg, neg), axis=-1)
    first_pos = xp.min(xp.where(real & (seg == seg_min[..., None]), pos, big), axis=-1)
    last_pos = xp.max(xp.where(real & (seg == seg_max[..., None]), pos, neg), axis=-1)
    pos_min = xp.min(xp.where(real, pos, big), axis=-1)
    pos_max = xp.max(xp.where(real, pos, neg), axis=-1)
    nz = real & (span != 0)
    span_min = xp.min(xp.where(nz, span, big), axis=-1)
    span_max = xp.max(xp.where(nz, span, neg), axis=-1)
    has_pad = xp.any(~real, axis=-1)
    has_text = xp.any(real & (span == 0), axis=-1)
    return BlockStats(seg_min, seg_max, first_pos, last_pos, pos_min, pos_max, span_min, span_max, has_pad, has_text)


def merge_stats(stats: BlockStats, xp=np) -> BlockStats:
    """The summaries of unions of blocks: ``stats`` [..., n, parts] -> [..., n], each the block_stats of its parts'
    tokens together (a tile made of smaller blocks, in any order: the context planner's permuted tiles)."""
    s = stats
    seg_min, seg_max = xp.min(s.seg_min, axis=-1), xp.max(s.seg_max, axis=-1)
    # A part holds tokens of the union's first (last) segment iff its own first (last) segment is that one.
    first_pos = xp.min(xp.where(s.seg_min == seg_min[..., None], s.first_pos, _BIG), axis=-1)
    last_pos = xp.max(xp.where(s.seg_max == seg_max[..., None], s.last_pos, -1), axis=-1)
    return BlockStats(seg_min, seg_max, first_pos, last_pos, xp.min(s.pos_min, axis=-1), xp.max(s.pos_max, axis=-1),
                      xp.min(s.span_min, axis=-1), xp.max(s.span_max, axis=-1), xp.any(s.has_pad, axis=-1),
                      xp.any(s.has_text, axis=-1))


def classify(q: BlockStats, k: BlockStats, *, window: int | None = None, span_isolated: bool = False, xp=np):
    """Block map [B, nQ, nK] from block summaries: 0 = no pair attends, 1 = partial, 2 = every pair attends.

    Skip is decided from facts that hold for every pair in the tile, so a skipped tile is truly empty; full likewise.
    """
    Q = BlockStats(*(a[:, :, None] for a in q))
    K = BlockStats(*(a[:, None, :] for a in k))
    q_empty = Q.seg_max < 0
    k_empty = K.seg_max < 0
    seg_disjoint = (Q.seg_max < K.seg_min) | (K.seg_max < Q.seg_min)
    # Every same-segment pair has k strictly after q: compare (segment, position) lexicographically.
    k_after_q = (K.seg_min > Q.seg_max) | ((K.seg_min == Q.seg_max) & (K.first_pos > Q.last_pos))
    single_seg = (Q.seg_min == Q.seg_max) & (K.seg_min == K.seg_max) & (Q.seg_min == K.seg_min)
    causal_none = k_after_q
    if window is not None:
        # Every same-segment pair is at least `window` apart with k before q (single segment: positions comparable).
        # Same-segment positions are known exactly where a side is one segment matching the other's first/last one.
        k_one, q_one = K.seg_min == K.seg_max, Q.seg_min == Q.seg_max
        far = (k_one & (K.seg_min == Q.seg_min) & (Q.first_pos - K.pos_max >= window)) | (
            q_one & (Q.seg_min == K.seg_max) & (Q.pos_min - K.last_pos >= window)
        )
        causal_none = causal_none | far
    span_overlap = (Q.span_max >= 0) & (K.span_max >= 0) & (
        xp.maximum(Q.span_min, K.span_min) <= xp.minimum(Q.span_max, K.span_max)
    )
    skip = q_empty | k_empty | seg_disjoint | (causal_none & ~span_overlap)
    if span_isolated:
        # Span tokens see only their own span; text tokens follow the causal rule.
        q_only_spans = ~Q.has_text
        skip = skip | (q_only_spans & ~span_overlap)

    no_pad = ~Q.has_pad & ~K.has_pad
    causal_all = K.pos_max <= Q.pos_min
    if window is not None:
        causal_all = causal_all & (Q.pos_max - K.pos_min < window)
    one_span = (
        ~Q.has_text
        & ~K.has_text
        & (Q.span_min == Q.span_max)
        & (K.span_min == K.span_max)
        & (Q.span_min == K.span_min)
    )
    if span_isolated:
        causal_all = causal_all & ~(Q.span_max >= 0)  # span tokens in q would not see k text
    full = no_pad & single_seg & (causal_all | one_span)
    return xp.where(skip, SKIP, xp.where(full, FULL, PARTIAL)).astype(xp.int32)


def block_map(
    q_meta: TokenMeta,
    k_meta: TokenMeta,
    block_q: int,
    block_k: int,
    *,
    window: int | None = None,
    span_isolated: bool = False,
    xp=None,
):
    """The tile map [B, ceil(Sq/block_q), ceil(Sk/block_k)] (int32). numpy in -> numpy out; jax in -> jax out."""
    xp = xp or _xp(*q_meta, *k_meta)
    return classify(
        block_stats(q_meta, block_q, xp),
        block_stats(k_meta, block_k, xp),
        window=window,
        span_isolated=span_isolated,
        xp=xp,
    )


def dense_block_map(
    q_meta: TokenMeta, k_meta: TokenMeta, block_q: int, block_k: int, *, window=None, span_isolated=False
) -> np.ndarray:
    """The exact tile map from the dense mask (numpy; tests and benchmarks only)."""
    m = np.asarray(mask(TokenMeta(*map(np.asarray, q_meta)), TokenMeta(*map(np.asarray, k_meta)),
                        window=window, span_isolated=span_isolated))
    b, sq, sk = m.shape
    nq, nk = -(-sq // block_q), -(-sk // block_k)
    pad = np.zeros((b, nq * block_q, nk * block_k), bool)
    pad[:, :sq, :sk] = m
    t = pad.reshape(b, nq, block_q, nk, block_k)
    anyv = t.any(axis=(2, 4))
    # A tile counts as full only if every real (q, k) pair of it attends and it has no ragged padding.
    allv = t.all(axis=(2, 4))
    return np.where(anyv, np.where(allv, FULL, PARTIAL), SKIP).astype(np.int32)


# ---- Tile lists: the block map compacted, for the kernels' loops and grids (jnp only)


class TileSchedule(NamedTuple):
    """Per row of a block map [B, nRows, nCols]: its non-skipped columns first (in increasing order), their kinds, and
    how many there are."""

    k_blocks: object  # int32 [B, nRows, nCols]; entries past `count` are not tiles to compute
    kinds: object  # int32 [B, nRows, nCols]; PARTIAL or FULL for the first `count` entries
    count: object  # int32 [B, nRows]


def compact(bm, *, repeat_last: bool = False) -> TileSchedule:
    """Per row of a block map [B, nRows, nCols], its non-skipped columns first (in increasing order) and their count.

    Applied to the block map it gives each q block's k blocks; applied to its transpose, each k block's q blocks.
    """
    # A stable sort on "is skipped" moves the computed blocks to the front and keeps them in increasing order.
    order = jnp.argsort(bm == SKIP, axis=-1, stable=True).astype(jnp.int32)
    count = jnp.sum(bm != SKIP, axis=-1).astype(jnp.int32)
    if repeat_last:
        # Entries past the count repeat the last listed column (0 if none): a Pallas index_map reading the list then
        # keeps the same block index on those grid steps and fetches nothing new.
        steps = jnp.arange(bm.shape[-1], dtype=jnp.int32)
        order = jnp.take_along_axis(order, jnp.minimum(steps, jnp.maximum(count - 1, 0)[..., None]), axis=-1)
    return TileSchedule(order, jnp.take_along_axis(bm, order, axis=-1).astype(jnp.int32), count)
