"""The block map (kernels.meta.block_map) is the contract every kernel's tile skipping rests on. Oracle: the exact tile
map from the dense mask (kernels.meta.dense_block_map). Sound means: a tile marked skip has no attending pair, a tile
marked full has every pair attending; numpy (host planner) and jnp (device) maps must be identical."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mllm_jax.kernels import FULL, PARTIAL, SKIP, TokenMeta, block_map, mask
from mllm_jax.kernels.meta import dense_block_map
from mask_families import FAMILY_NAMES, all_cases, make_meta, permute

BLOCKS = [(16, 16), (32, 8), (8, 64)]
OPTIONS = [dict(), dict(window=7), dict(window=40), dict(span_isolated=True), dict(window=20, span_isolated=True)]


# One jitted function, so each (shape, blocks, options) compiles once across the tests.
_block_map_jit = jax.jit(block_map, static_argnames=("block_q", "block_k", "window", "span_isolated"))


def _check_sound(q_meta, k_meta, bq, bk, **opts):
    bm_np = block_map(q_meta, k_meta, bq, bk, **opts)
    assert isinstance(bm_np, np.ndarray)
    bm_jnp = _block_map_jit(
        TokenMeta(*map(jnp.asarray, q_meta)), TokenMeta(*map(jnp.asarray, k_meta)), block_q=bq, block_k=bk, **opts
    )
    np.testing.assert_array_equal(bm_np, np.asarray(bm_jnp))
    exact = dense_block_map(q_meta, k_meta, bq, bk, **opts)
    assert bm_np.shape == exact.shape
    # A skipped tile must be truly empty; a full tile truly full. (Partial is always allowed: it only costs a mask.)
    bad_skip = (bm_np == SKIP) & (exact != SKIP)
    bad_full = (bm_np == FULL) & (exact != FULL)
    assert not bad_skip.any(), f"tiles marked skip that attend: {np.argwhere(bad_skip)[:5]}"
    assert not bad_full.any(), f"tiles marked full that are not: {np.argwhere(bad_full)[:5]}"
    return bm_np, exact


@pytest.mark.parametrize("bq,bk", BLOCKS)
def test_block_map_sound_over_families(bq, bk):
    # Ragged lengths (not multiples of the blocks) and a padded tail, q and k of different lengths.
    for length, pad in ((200, 0), (203, 11)):
        for name, meta in all_cases(2, length, seed=length, pad=pad):
            for opts in OPTIONS:
                _check_sound(meta, meta, bq, bk, **opts)


def test_block_map_sound_under_independent_permutations():
    for fam in FAMILY_NAMES:
        meta = make_meta(fam, 2, 160, seed=3, pad=7)
        q_meta, _ = permute(meta, seed=10)
        k_meta, _ = permute(meta, seed=11)
        for opts in OPTIONS:
            _check_sound(q_meta, k_meta, 16, 32, **opts)
            # A slice of q (a context-parallel shard) against all of k.
            _check_sound(TokenMeta(*(a[:, 40:100] for a in meta)), meta, 16, 16, **opts)


def test_block_map_is_tight_on_ordered_families():
    # Soundness alone would allow an all-partial map. On unpermuted families the summaries are exact enough that most
    # non-empty tiles are classified right; require every truly-empty tile to be skipped (a computed empty tile is
    # wasted work the benchmarks count) for the plain rule.
    for name, meta in all_cases(1, 256, seed=5)[:-1]:
        bm, exact = _check_sound(meta, meta, 16, 16)
        missed_skip = (exact == SKIP) & (bm != SKIP)
        assert not missed_skip.any(), f"{name}: {int(missed_skip.sum())} empty tiles not skipped"
        if name == "causal":
            np.testing.assert_array_equal(bm, exact)


def test_dense_block_map_counts_ragged_tiles_as_partial():
    meta = TokenMeta.causal(1, 20)
    exact = dense_block_map(meta, meta, 16, 16)
    # Tile (1, 0): q 16..19 see k 0..15 fully, but the tile's 12 padded rows make it partial, never full.
    assert exact[0, 1, 0] == PARTIAL and exact[0, 0, 0] == PARTIAL and exact[0, 0, 1] == SKIP
    assert mask(meta, meta).sum() == 20 * 21 // 2
