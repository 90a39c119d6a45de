"""The context-parallel token planner (parallel/context.py), checked against the dense mask and closed forms."""

import itertools
import time

import numpy as np
import pytest

from benchmarks.cp_balance import FAMILIES, family_meta
from mllm_jax.kernels.meta import TokenMeta, dense_block_map
from mllm_jax.parallel.context import MODES, block_costs, permute_batch, plan, unpermute


def random_meta(batch, length, rng, shuffle=False):
    """Packed segments (some padding gaps) of text and spans of random lengths; optionally tokens shuffled, which
    breaks every contiguity assumption (segments and spans scattered over blocks)."""
    pos, seg, span = (np.zeros((batch, length), np.int32) for _ in range(3))
    for i in range(batch):
        t, segment, span_id = 0, 1, 1
        while t < length:
            n = min(int(rng.integers(1, length // 2 + 2)), length - t)
            if rng.random() < 0.15:  # a padding gap
                t += n
                continue
            p, u = 0, t
            while u < t + n:
                m = min(int(rng.integers(1, 80)), t + n - u)
                if rng.random() < 0.4:
                    span[i, u : u + m] = span_id
                    span_id += 1
                pos[i, u : u + m] = np.arange(p, p + m)
                p, u = p + m, u + m
            seg[i, t : t + n] = segment
            segment, t = segment + 1, t + n
    meta = TokenMeta(pos, seg, span)
    if shuffle:
        meta = meta.take(np.stack([rng.permutation(length) for _ in range(batch)]))
    return meta


def test_block_costs_equal_dense_recount():
    rng = np.random.default_rng(0)
    for trial in range(30):
        b, s = int(rng.integers(1, 4)), int(rng.integers(1, 600))
        meta = random_meta(b, s, rng, shuffle=trial % 3 == 0)
        block, tile_k = [(128, 32), (64, 16), (32, 32)][trial % 3]
        tiles, tokens = block_costs(meta, block, tile_k)
        dense = dense_block_map(meta, meta, block, tile_k)
        np.testing.assert_array_equal(tiles, (dense != 0).sum(-1))
        nb = dense.shape[1]
        real = np.pad(meta.segment_ids != 0, ((0, 0), (0, nb * block - s)))
        np.testing.assert_array_equal(tokens, real.reshape(b, nb, block).sum(-1))


@pytest.mark.parametrize("mode", MODES)
def test_plan_is_a_valid_permutation_with_recounted_costs(mode):
    rng = np.random.default_rng(1)
    for cp in (1, 2, 3, 4, 8):
        b, s = 2, int(rng.integers(100, 1500))
        meta = random_meta(b, s, rng, shuffle=cp == 3)
        p = plan(meta, cp, mode)
        perm = p.permutation
        assert perm.shape[0] == b and p.padded_len % (cp * p.block) == 0 and p.padded_len >= s
        for row in perm:  # every original token exactly once, the rest -1
            np.testing.assert_array_equal(np.sort(row[row >= 0]), np.arange(s))
            assert np.all(row[row < 0] == -1)
        # Independent recount on the permuted sequence: rank r holds slots [r S'/cp, (r+1) S'/cp).
        pm = p.permute_meta(meta)
        tiles = (dense_block_map(pm, pm, p.block, p.tile_k) != 0).sum(-1).reshape(b, cp, -1).sum((0, 2))
        tokens = (pm.segment_ids != 0).reshape(b, cp, -1).sum((0, 2))
        np.testing.assert_array_equal(p.rank_tiles, tiles)
        np.testing.assert_array_equal(p.rank_tokens, tokens)
        np.testing.assert_allclose(p.rank_cost, p.alpha * tiles + p.beta * tokens, rtol=1e-12)
        if mode != "lpt":  # every rank holds the same number of blocks of every sequence
            blocks = np.stack([np.bincount(o, minlength=cp) for o in p.block_owner])
            n_pad = p.padded_len // p.block
            assert n_pad % cp == 0 and blocks.max() <= n_pad // cp


def test_uniform_and_zigzag_layouts():
    meta = TokenMeta.causal(1, 16 * 128)
    np.testing.assert_array_equal(plan(meta, 4, "uniform").block_owner[0], np.repeat(np.arange(4), 4))
    # 2 cp chunks of 2 blocks: rank r gets chunks r and 2cp - 1 - r.
    np.testing.assert_array_equal(
        plan(meta, 4, "zigzag").block_owner[0], [0, 0, 1, 1, 2, 2, 3, 3, 3, 3, 2, 2, 1, 1, 0, 0]
    )


def test_lpt_reproduces_cornstarch_patterns():
    n = 24
    causal = TokenMeta.causal(1, n * 128)
    owner = plan(causal, 4, "lpt").block_owner[0]
    # Boustrophedon read from the end: 0,1,2,3,3,2,1,0,0,1,2,3,...
    snake = np.concatenate([[0, 1, 2, 3], [3, 2, 1, 0]] * (n // 8))
    np.testing.assert_array_equal(owner[::-1], snake)
    full = TokenMeta(causal.positions, causal.segment_ids, np.ones_like(causal.span_ids))  # one span: full mask
    np.testing.assert_array_equal(plan(full, 4, "lpt").block_owner[0], np.arange(n) % 4)
    # Each rank's blocks are in ascending order in its shard.
    p = plan(causal, 4, "lpt")
    for r in range(4):
        shard = p.permutation[0, r * p.shard_len : (r + 1) * p.shard_len]
        shard = shard[shard >= 0]
        np.testing.assert_array_equal(shard, np.sort(shard))


def test_balanced_beats_lpt_on_combined_cost():
    worse = []
    for fi, family in enumerate(FAMILIES):
        rng = np.random.default_rng([3, fi])
        for _ in range(3):
            meta = family_meta(family, 4096, rng)
            costs = block_costs(meta)
            lpt = plan(meta, 8, "lpt", costs=costs)
            bal = plan(meta, 8, "balanced", costs=costs)
            # Lower bound: no assignment of whole blocks beats total / cp or the heaviest block.
            assert bal.rank_cost.max() >= max(bal.lower_bound, (bal.alpha * costs[0] + bal.beta * costs[1]).max())
            if bal.imbalance() > lpt.imbalance() + 1e-12:
                worse.append((family, bal.imbalance(), lpt.imbalance()))
    assert not worse, worse


def test_balanced_refinement_against_exhaustive_optimum():
    # 8 blocks on 2 ranks of 4: the exhaustive optimum is the oracle. The swaps never hurt and usually reach it.
    from mllm_jax.parallel.context import _assign_balanced

    rng = np.random.default_rng(5)
    n, reached, improved = 120, 0, 0
    for _ in range(n):
        cost = rng.integers(1, 100, (1, 8)).astype(float)
        makespan = lambda owner: max(cost[0][owner[0] == r].sum() for r in range(2))  # noqa: E731
        greedy = _assign_balanced(cost, 2, max_swaps=0)
        refined = _assign_balanced(cost, 2, max_swaps=1000)
        assert np.bincount(refined[0], minlength=2).tolist() == [4, 4]
        opt = min(max(cost[0, list(c)].sum(), cost.sum() - cost[0, list(c)].sum())
                  for c in itertools.combinations(range(8), 4))
        assert opt <= makespan(refined) <= makespan(greedy)
        reached += makespan(refined) == opt
        improved += makespan(refined) < makespan(greedy)
    assert improved > 0 and reached >= 0.8 * n, (reached, improved)


@pytest.mark.parametrize("tiles", [{}, {"tile_q": 512, "tile_k": 1024}, {"block": 64, "tile_q": 64, "tile_k": 128}])
def test_plan_128k_is_fast(tiles):
    """Per-block tiles, and kernel tiles larger than the block (counted on the permuted shards, then refined)."""
    meta = family_meta("multimodal_packed", 131072, np.random.default_rng(0))
    plan(meta, 8, "balanced", **tiles)  # warm caches
    t0 = time.perf_counter()
    plan(meta, 8, "balanced", **tiles)
    assert time.perf_counter() - t0 < 0.5


def test_permute_batch_fills_padding_and_round_trips():
    rng = np.random.default_rng(4)
    b, s = 2, 300
    meta = random_meta(b, s, rng)
    p = plan(meta, 4, "balanced", block=32, tile_k=8)
    ids = rng.integers(1, 1000, (b, s)).astype(np.int32)
    labels = np.concatenate([ids[:, 1:], np.full((b, 1), -100, np.int32)], axis=1)  # shifted before permuting
    fidx = np.where(meta.span_ids > 0, np.arange(s), -1).astype(np.int32)
    pixels = np.ones((3, 4, 4, 3), np.float32)
    batch = dict(input_ids=ids, labels=labels, positions=meta.positions, segment_ids=meta.segment_ids,
                 span_ids=meta.span_ids, feature_index={"vision": fidx}, encoder_inputs={"vision": pixels})
    out = permute_batch(batch, p)
    pad = p.permutation < 0
    assert out["input_ids"].shape == (b, p.padded_len)
    assert np.all(out["labels"][pad] == -100) and np.all(out["segment_ids"][pad] == 0)
    assert np.all(out["feature_index"]["vision"][pad] == -1)
    assert out["encoder_inputs"]["vision"] is pixels
    for key in ("input_ids", "labels", "positions", "segment_ids", "span_ids"):
        np.testing.assert_array_equal(unpermute(out[key], p), batch[key])
    np.testing.assert_array_equal(unpermute(out["feature_index"]["vision"], p), fidx)
    # The loss-relevant multiset is unchanged: the same label count.
    assert (out["labels"] != -100).sum() == (labels != -100).sum()


def test_bad_inputs_are_refused_with_the_values():
    meta = TokenMeta.causal(1, 256)
    with pytest.raises(ValueError, match="mode"):
        plan(meta, 2, "striped")
    with pytest.raises(ValueError, match="cp"):
        plan(meta, 0)
    with pytest.raises(ValueError, match="method"):
        plan(meta, 2, method="ulysses")
    with pytest.raises(ValueError, match=r"tile_q \(0\)"):
        plan(meta, 2, tile_q=0)
    bad = TokenMeta(meta.positions, meta.segment_ids[:, :10], meta.span_ids)
    with pytest.raises(ValueError, match=r"\[B, S\]"):
        plan(bad, 2)
    neg = TokenMeta(meta.positions - 5, meta.segment_ids, meta.span_ids)
    with pytest.raises(ValueError, match="positions"):
        plan(neg, 2)
    p = plan(meta, 2)
    with pytest.raises(ValueError, match="labels"):
        permute_batch({"labels": np.zeros((1, 100), np.int32)}, p)
    # A length not divisible by cp x block is padded, not refused.
    odd = plan(TokenMeta.causal(1, 1000), 3, block=64, tile_k=32)
    assert odd.padded_len == 3 * 64 * 6 and odd.seq_len == 1000


def test_permute_for_context_costs_blocks_with_the_trained_models_shapes():
    """With the trained LLM's config the planner's alpha (per non-empty tile) and beta (per token) come from its
    shapes, not the Llama-3-8B default; a small model weighs tokens (its MLP) very differently against tiles."""
    from types import SimpleNamespace

    from mllm_jax.config import LLMConfig
    from mllm_jax.data.context_batches import cost_model_for, permute_for_context
    from mllm_jax.parallel.cost_model import CostModel

    meta = family_meta("multimodal_packed", 2048, np.random.default_rng(3))
    batch = {"input_ids": np.ones_like(meta.positions), "labels": np.ones_like(meta.positions),
             "positions": meta.positions, "segment_ids": meta.segment_ids, "span_ids": meta.span_ids}
    pc = SimpleNamespace(context=4, context_config=SimpleNamespace(mode="balanced", block=128, attention="allgather"))
    llm = LLMConfig(d_model=512, n_heads=8, n_kv_heads=2, d_ff=1024)
    _, default_plan = permute_for_context(batch, pc, leading=0)
    _, model_plan = permute_for_context(batch, pc, leading=0, llm_config=llm)
    want = CostModel(d_model=512, d_ff=1024, n_heads=8, n_kv_heads=2, head_dim=64, tile_q=128, tile_k=32)
    assert (model_plan.alpha, model_plan.beta) == (want.alpha, want.beta)
    assert (default_plan.alpha, default_plan.beta) == (CostModel().alpha, CostModel().beta)
    assert model_plan.beta / model_plan.alpha != default_plan.beta / default_plan.alpha
    assert cost_model_for(llm, block=128, tile_k=32) == want


def test_block_costs_count_tiles_of_any_height_dividing_the_block():
    rng = np.random.default_rng(8)
    for tile_q, tile_k in ((64, 128), (32, 32), (128, 64)):
        meta = random_meta(2, 700, rng, shuffle=tile_q == 32)
        tiles, tokens = block_costs(meta, 128, tile_k, tile_q)
        dense = (dense_block_map(meta, meta, tile_q, tile_k) != 0).sum(-1)  # [B, rows of tile_q]
        rows = -(-700 // 128) * (128 // tile_q)
        np.testing.assert_array_equal(tiles, np.pad(dense, ((0, 0), (0, rows - dense.shape[1]))).reshape(
            2, -1, 128 // tile_q).sum(-1))
    with pytest.raises(ValueError, match=r"tile_q \(96\)"):
        block_costs(meta, 128, 32, 96)


def _batch(meta):
    ids = np.ones_like(meta.positions)
    return {"input_ids": ids, "labels": ids, "positions": meta.positions, "segment_ids": meta.segment_ids,
            "span_ids": meta.span_ids}


def _live_kernel_tiles(p, meta, method):
    """Brute force: per rank, the live tiles of kernels.meta.block_map (the kernels' own tile rule) of its permuted q
    shard against every key (all-gather) or against each K/V shard in turn (the ring's shard pairs)."""
    from mllm_jax.kernels.meta import block_map

    pm = p.permute_meta(meta)
    n = p.shard_len
    shard = lambda r: TokenMeta(*(a[:, r * n : (r + 1) * n] for a in pm))  # noqa: E731
    k_parts = [pm] if method == "allgather" else [shard(j) for j in range(p.cp)]
    return np.array([sum(int((block_map(shard(r), kp, p.tile_q, p.tile_k, xp=np) != 0).sum()) for kp in k_parts)
                     for r in range(p.cp)])


PLATFORMS = [
    ("tpu", "v5e", "allgather", (512, 1024)),  # pallas_tpu's v5e blocks (head dim 128) over the gathered keys
    ("tpu", "v5e", "ring", (512, 1024)),  # the same kernel per ring step
    ("gpu", "h100", "ring", (64, 128)),  # pallas_gpu's H100 blocks, per ring step
    ("gpu", "h100", "allgather", (64, 128)),
]


@pytest.mark.parametrize("block", [64, 128, 256, 512])
@pytest.mark.parametrize("backend, generation, method, tile", PLATFORMS)
def test_planner_counts_the_kernels_own_tiles_for_any_block(backend, generation, method, tile, block):
    """permute_for_context(attention_impl=...) counts the tiles of the kernel the run's platform resolves to
    (kernels.dispatch.kernel_tile: the kernels' block tables), so each rank's planned tiles are exactly the live tiles
    that kernel computes on the rank's permuted shard, whether ContextConfig.block is a multiple of the tile or
    smaller than it (a kernel tile then spans several blocks the permutation brought together): recounted by brute
    force with the kernel's own block map over the permuted order. With the default 128 x 32 tiles they disagree."""
    from mllm_jax.config import LLMConfig
    from mllm_jax.data.context_batches import permute_for_context
    from mllm_jax.parallel.config import ContextConfig, ParallelConfig

    cp, s = 4, 4096
    meta = _meta_rows(["multimodal_packed", "interleaved_multi_image"], s)
    pc = ParallelConfig(context=cp, context_config=ContextConfig(mode="balanced", block=block, attention=method))
    llm = LLMConfig(d_model=1024, n_heads=8, n_kv_heads=2, d_ff=2048, head_dim=128)
    _, p = permute_for_context(_batch(meta), pc, leading=0, llm_config=llm, attention_impl="auto", backend=backend,
                               generation=generation)
    assert (p.tile_q, p.tile_k, p.method) == (*tile, method)
    live = _live_kernel_tiles(p, meta, method)
    np.testing.assert_array_equal(p.rank_tiles, live)
    _, old = permute_for_context(_batch(meta), pc, leading=0, llm_config=llm)  # block x 32 tiles
    assert not np.array_equal(old.rank_tiles, live)


def test_planner_counts_the_cpu_ring_tiles():
    from mllm_jax.config import LLMConfig
    from mllm_jax.data.context_batches import permute_for_context
    from mllm_jax.parallel.config import ContextConfig, ParallelConfig

    meta = _meta_rows(["video", "llava_single_image"], 4096)
    pc = ParallelConfig(context=4, context_config=ContextConfig(mode="zigzag", block=64, attention="ring"))
    _, p = permute_for_context(_batch(meta), pc, leading=0, llm_config=LLMConfig(d_model=256, n_heads=4, d_ff=512),
                               attention_impl="xla", backend="cpu")
    assert (p.tile_q, p.tile_k) == (128, 128)  # kernels.tiled, the ring's CPU step
    np.testing.assert_array_equal(p.rank_tiles, _live_kernel_tiles(p, meta, "ring"))


@pytest.mark.parametrize("mode", MODES)
def test_kernel_tiles_larger_than_the_block_on_shuffled_tokens(mode):
    """Any mode, odd lengths (a ragged last block, shards not a multiple of the q tile), tokens shuffled (segments and
    spans scattered, so a tile's summary is far from exact), tiles that are not multiples of one another: the plan's
    rank tiles are still the kernel block map's live tiles on every rank."""
    rng = np.random.default_rng(12)
    for cp, block, tile, method in ((3, 32, (96, 64), "ring"), (2, 48, (64, 128), "allgather"),
                                    (4, 16, (40, 24), "ring")):
        meta = random_meta(2, int(rng.integers(300, 900)), rng, shuffle=True)
        p = plan(meta, cp, mode, block, tile_q=tile[0], tile_k=tile[1], method=method)
        np.testing.assert_array_equal(p.rank_tiles, _live_kernel_tiles(p, meta, method))


def test_refinement_on_kernel_tiles_never_raises_the_largest_rank():
    """With a tile larger than the block, balanced swaps blocks while the largest rank load on the kernel's real tiles
    falls: never above the unrefined plan, lower on some masks; both recounted by brute force."""
    lower = 0
    for fi, family in ((0, "causal_blockwise"), (2, "prefix_lm_document"), (5, "llava_single_image")):
        meta = family_meta(family, 4096, np.random.default_rng([9, fi]))
        kw = dict(tile_q=128, tile_k=256, method="allgather")
        raw = plan(meta, 4, "balanced", 32, refine_rounds=0, **kw)
        ref = plan(meta, 4, "balanced", 32, **kw)
        for p in (raw, ref):
            np.testing.assert_array_equal(p.rank_tiles, _live_kernel_tiles(p, meta, "allgather"))
        assert ref.rank_cost.max() <= raw.rank_cost.max()
        lower += ref.rank_cost.max() < raw.rank_cost.max()
    assert lower >= 1


def _meta_rows(families, length):
    metas = [family_meta(f, length, np.random.default_rng([4, i])) for i, f in enumerate(families)]
    return TokenMeta(*(np.concatenate([getattr(m, f) for m in metas]) for f in TokenMeta._fields))


# ------------------------------------------------------------------------------------ ContextConfig.block = "auto"

# (attention_impl, backend, generation, the kernel's tile on long sequences at head dim 128: the kernels' tables)
AUTO_TARGETS = {
    "tpu_v5e": ("pallas_tpu", "tpu", "v5e", (512, 1024)),
    "tpu_v5p": ("pallas_tpu", "tpu", "v5p", (512, 1024)),
    "gpu_h100": ("pallas_gpu", "gpu", "h100", (64, 128)),
    "cpu": ("auto", "cpu", None, (128, 128)),  # kernels.tiled (the ring's CPU step; the all-gather's from 256 keys)
}
_PADDED = {}


def _plan_padded_len(s, cp, mode, block):
    """The oracle: the padded length plan() itself gives for ``block`` (cached: targets share it)."""
    key = (s, cp, mode, block)
    if key not in _PADDED:
        _PADDED[key] = plan(TokenMeta.causal(1, s), cp, mode, block, tile_k=min(block, 32)).padded_len
    return _PADDED[key]


@pytest.mark.parametrize("target", list(AUTO_TARGETS))
def test_auto_block_per_target(target):
    """ContextConfig.block = "auto" (data.context_batches.context_block): on long sequences the smallest block both
    sides of the target's kernel tile divide (v5e / v5p 1024, H100 128, CPU 128), so its tiles move whole; at every
    S, cp, mode and method the largest power of two up to that whose plan pads S at most S / 32 beyond the least any
    power-of-two block >= 16 pads it to (plan()'s own padded lengths); short sequences get the small block that pads
    least. And the plan permute_for_context makes with "auto" is a plan of that block."""
    from mllm_jax.data.context_batches import context_block, permute_for_context
    from mllm_jax.kernels.dispatch import kernel_tile
    from mllm_jax.parallel.config import ContextConfig, ParallelConfig

    impl, backend, gen, tile = AUTO_TARGETS[target]
    where = dict(attention_impl=impl, backend=backend, generation=gen)
    lcm = int(np.lcm(*tile))
    for s, cp, mode, method in itertools.product((300, 1000, 4096, 12200, 32768), (2, 8), ("balanced", "zigzag"),
                                                 ("allgather", "ring")):
        pc = ParallelConfig(context=cp, context_config=ContextConfig(mode=mode, block="auto", attention=method))
        got = context_block(pc, s, 128, **where)
        # The kernel's tile on this shard (the kernels shrink it to a short one): the block stops at its lcm.
        shard = -(-s // cp)
        ring_cpu = method == "ring" and backend == "cpu"  # the ring's CPU step is kernels.tiled
        shard_tile = kernel_tile("tiled" if ring_cpu else impl, shard, shard if method == "ring" else s, 128, backend,
                                 gen)
        top = 1 << (int(np.lcm(*shard_tile)).bit_length() - 1)
        powers = [1 << i for i in range(4, top.bit_length())]
        fits = [b for b in powers if _plan_padded_len(s, cp, mode, b)
                <= min(_plan_padded_len(s, cp, mode, p) for p in powers) + s / 32]
        assert got == max(fits), (target, s, cp, mode, method, got, fits)
        if s == 32768:
            assert got == lcm, (target, cp, mode, method, got)
        if s == 300:  # cheaper than block 128: 320 tokens at cp 2 (blocks of 32), 384 at cp 8 (16); 512 / 1024
            assert _plan_padded_len(s, cp, mode, got) < _plan_padded_len(s, cp, mode, 128)
    meta = _meta_rows(["video"], 12200)
    pc = ParallelConfig(context=8, context_config=ContextConfig(block="auto"))
    _, p = permute_for_context(_batch(meta), pc, leading=0, **where)
    assert p.block == context_block(pc, 12200, 128, **where) and p.padded_len == _plan_padded_len(12200, 8,
                                                                                                   "balanced", p.block)
    np.testing.assert_array_equal(p.rank_tiles, _live_kernel_tiles(p, meta, "allgather"))


def test_auto_block_with_a_short_shard_is_the_shrunk_tiles():
    """The kernels shrink their tile to a short shard (pallas_tpu to the 128-row multiple, kernels.tiled to the
    8-row one): 4096 tokens over 8 ranks on v5e is 512-row shards against 4096 keys, the 512 x 1024 tile, block
    512 (1024 would pad to 8192); the ring's CPU step on 32-token shards (train.py's tiny context runs) is 32 x 32."""
    from mllm_jax.data.context_batches import context_block
    from mllm_jax.parallel.config import ContextConfig, ParallelConfig

    pc = ParallelConfig(context=8, context_config=ContextConfig(block="auto"))
    assert context_block(pc, 4096, 128, "pallas_tpu", "tpu", "v5e") == 512
    ring = ParallelConfig(context=2, context_config=ContextConfig(block="auto", attention="ring"))
    assert context_block(ring, 64, 16, "auto", "cpu") == 32


def test_auto_block_is_no_heavier_than_block_128_on_the_families():
    """benchmarks/cp_balance.py's families at 8K-32K tokens, cp = 8, pallas_tpu's v5e tile, balanced: the largest
    rank cost of the plan with block "auto" (alpha x the kernel's exact live tiles + beta x tokens) is at most block
    128's for every family, all-gather and ring, and lower on most (1024-token blocks: the tiles move whole)."""
    from mllm_jax.data.context_batches import permute_for_context
    from mllm_jax.parallel.config import ContextConfig, ParallelConfig

    lower = total = 0
    for s, method in ((8192, "allgather"), (12288, "allgather"), (16384, "ring"), (32768, "allgather"),
                      (32768, "ring")):
        for fi, family in enumerate(FAMILIES):
            batch = _batch(family_meta(family, s, np.random.default_rng([21, fi, s])))
            cost = {}
            for block in ("auto", 128):
                pc = ParallelConfig(context=8, context_config=ContextConfig(block=block, attention=method))
                _, p = permute_for_context(batch, pc, leading=0, attention_impl="pallas_tpu", backend="tpu",
                                           generation="v5e")
                cost[block] = (p.rank_cost.max(), p.block, p.padded_len)
            assert cost["auto"][1] > 128 and cost["auto"][2] == cost[128][2] == s
            assert cost["auto"][0] <= cost[128][0], (s, method, family, cost)
            lower += cost["auto"][0] < cost[128][0]
            total += 1
    assert lower >= total // 2, (lower, total)


def test_bad_blocks_are_refused_with_the_values():
    from mllm_jax.parallel.config import ContextConfig
    from mllm_jax.parallel.context import auto_block

    for bad in ("big", 0, -128, 64.0, True):
        with pytest.raises(ValueError, match=rf"ContextConfig.block must be 'auto' or a positive integer; got {bad!r}"):
            ContextConfig(block=bad)
    with pytest.raises(ValueError, match="tile_k must be a positive integer; got 0"):
        auto_block(4096, 8, "balanced", 512, 0)
    with pytest.raises(ValueError, match="mode must be one of"):
        auto_block(4096, 8, "striped", 512, 1024)
    with pytest.raises(ValueError, match="block must be a positive integer"):
        plan(TokenMeta.causal(1, 256), 2, "balanced", "auto")
