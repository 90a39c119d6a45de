"""Packing native-resolution instances into patch rows, the M-RoPE positions of packed samples, and the batch checks
(mllm_jax.data.native_pack, mllm_jax.batch): host-side numpy, oracles from transformers' Qwen2-VL."""

import types

import numpy as np
import pytest

from mllm_jax.batch import check_batch
from mllm_jax.config import LLMConfig, ModelConfig, NativeVisionConfig, ProjectorConfig
from mllm_jax.data import native_pack as npk

M2 = 4  # merge_size 2


def test_row_buckets_are_few_and_cover():
    assert npk.row_buckets(1) == (1,)
    assert npk.row_buckets(5) == (1, 2, 3, 4, 6)
    assert npk.row_buckets(16)[-1] == 16 and len(npk.row_buckets(100)) <= 14


def test_plan_first_fit_no_overlap_aligned_and_smallest_bucket():
    counts = [16, 36, 8, 64, 4, 24, 12]
    plan = npk.plan_rows(counts, 64, M2, npk.row_buckets(len(counts)))
    assert plan.used == sum(counts) and plan.padding == plan.rows * 64 - sum(counts)
    occupied = np.zeros((plan.rows, 64), int)
    for n, r, o in zip(counts, plan.row, plan.offset):
        assert o % M2 == 0 and o + n <= 64
        occupied[r, o:o + n] += 1
    assert occupied.max() == 1  # no two instances share a patch
    # 164 patches need 3 rows of 64 (first-fit decreasing reaches it); 3 is a bucket.
    assert plan.rows == 3 and len(set(plan.row.tolist())) == 3


@pytest.mark.parametrize("counts,p,buckets,match", [
    ([16, 68], 64, (1, 2, 3), "instance 1 has 68 patches, more than a packed row holds"),
    ([16, 6], 64, (1, 2), "instance 1 has 6 patches: it must be a positive multiple of merge_size"),
    ([64, 64, 64], 64, (1, 2), "need 3 rows of 64 patches; the row buckets go up to 2"),
    ([0], 64, (1,), "instance 0 has 0 patches"),
])
def test_plan_refuses_what_does_not_fit(counts, p, buckets, match):
    with pytest.raises(ValueError, match=match):
        npk.plan_rows(counts, p, M2, buckets)


def _grid_coords(t, h, w, m=2):
    """Each patch's (t, h, w) in HF's merge-group-major order (t, h/m, w/m, m, m): the test's own input."""
    tt, hb, wb, hi, wi = np.meshgrid(np.arange(t), np.arange(h // m), np.arange(w // m), np.arange(m), np.arange(m),
                                     indexing="ij")
    return np.stack([tt, hb * m + hi, wb * m + wi], -1).reshape(-1, 3)


def test_pack_places_every_instance_and_its_features():
    grids = [(1, 4, 6), (2, 2, 2), (1, 8, 4), (1, 2, 4)]
    k = 5
    rng = np.random.default_rng(0)
    patches = [rng.normal(size=(t * h * w, k)).astype(np.float32) for t, h, w in grids]
    coords = [_grid_coords(*g) for g in grids]
    plan = npk.plan_rows([len(x) for x in patches], 32, M2, npk.row_buckets(4))
    packed = npk.pack(patches, coords, plan, M2, rows=plan.rows + 1)
    x, g, s = (packed.inputs[k_] for k_ in ("patches", "grid", "segment_ids"))
    assert x.shape == (plan.rows + 1, 32, k) and packed.padding == x.shape[0] * 32 - sum(map(len, patches))
    for i, (r, o) in enumerate(zip(plan.row, plan.offset)):
        n = len(patches[i])
        np.testing.assert_array_equal(x[r, o:o + n], patches[i])
        np.testing.assert_array_equal(g[r, o:o + n], coords[i])
        assert len(np.unique(s[r, o:o + n])) == 1 and s[r, o] > 0
        assert packed.feature_base[i] == (r * 32 + o) // M2
    assert (s[-1] == 0).all()  # the extra row is padding


# ---------------------------------------------------------------------------------------------------- M-RoPE vs HF


def _hf_rope_index(kind, input_ids, token_types, image_grids, video_grids, second_per_grid=None, tps=0.0):
    """transformers' get_rope_index on a stand-in `self` (it reads only the config and get_vision_position_ids)."""
    import torch

    if kind == "qwen2_vl":
        from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLModel as M
    else:
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel as M
    me = types.SimpleNamespace(config=types.SimpleNamespace(
        vision_config=types.SimpleNamespace(spatial_merge_size=2, tokens_per_second=tps)))
    me.get_vision_position_ids = lambda *a, **kw: M.get_vision_position_ids(me, *a, **kw)
    kw = {}
    if kind != "qwen2_vl" and second_per_grid is not None:
        kw["second_per_grid_ts"] = torch.tensor(second_per_grid)
    pos, _ = M.get_rope_index(me, torch.tensor([input_ids]), torch.tensor([token_types]),
                              image_grid_thw=torch.tensor(image_grids) if image_grids else None,
                              video_grid_thw=torch.tensor(video_grids) if video_grids else None, **kw)
    return pos[:, 0].numpy().T  # [S, 3]


def _sample_layout(items, text_runs):
    """Token types (0 text, 1 image, 2 video) and spans for text runs interleaved with instances."""
    types_, spans = [], []
    for run, item in zip(text_runs, items + [None]):
        types_ += [0] * run
        if item is not None:
            kind, thw, interval = item
            n = thw[0] * (thw[1] // 2) * (thw[2] // 2)
            spans.append((len(types_), thw, interval))
            types_ += [1 if kind == "image" else 2] * n
    return types_, spans


@pytest.mark.parametrize("kind,tps", [("qwen2_vl", 0.0), ("qwen2_5_vl", 4.0)])
def test_rope_positions_equal_transformers(kind, tps):
    sec = 0.5  # second_per_grid_t of the video (temporal_patch_size / fps)
    interval = tps * sec if kind == "qwen2_5_vl" else 1
    items = [("image", (1, 4, 6), 1), ("video", (3, 4, 2), interval), ("image", (1, 2, 8), 1)]
    types_, spans = _sample_layout(items, [3, 2, 1, 4])
    ours = npk.rope_positions(len(types_), spans, 2)
    hf = _hf_rope_index(kind, [7] * len(types_), types_, [(1, 4, 6), (1, 2, 8)], [(3, 4, 2)], [sec], tps)
    np.testing.assert_array_equal(ours, hf)
    if kind == "qwen2_5_vl":  # the video's temporal positions really are scaled (the test could fail)
        assert len(np.unique(ours[spans[1][0]:spans[1][0] + 6, 0])) == 3 and ours[:, 0].max() >= 8


def test_rope_positions_refuse_overlap_and_bad_grid():
    with pytest.raises(ValueError, match="overlaps another or runs past"):
        npk.rope_positions(10, [(2, (1, 4, 4), 1), (4, (1, 2, 2), 1)], 2)
    with pytest.raises(ValueError, match="multiples of merge_size"):
        npk.rope_positions(10, [(0, (1, 3, 4), 1)], 2)


# ------------------------------------------------------------------------------------------------------ check_batch


def _config(patches_per_row=32, window=0):
    """``window``: a Qwen2.5-VL tower with windows of that many merged units (patch 2, merge 2)."""
    kind = dict(kind="qwen2_5_vl", window_size=4 * window, full_attention_layers=(0,)) if window else {}
    enc = NativeVisionConfig(patch_size=2, temporal_patch_size=2, num_channels=1, d_model=8, n_layers=1, n_heads=2,
                             d_ff=16, patches_per_row=patches_per_row, **kind)
    return ModelConfig(llm=LLMConfig(vocab_size=32, d_model=8, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=16),
                       encoders={"vision": enc}, projectors={"vision": ProjectorConfig(kind="patch_merger")},
                       placeholder_ids={"vision": 3})


def _native_batch(grids, seq_len=40, per_sample=((0, 1), (2,)), window=0, patches_per_row=32):
    """Two samples (by default: instances 0, 1 in sample 0, instance 2 in sample 1), packed (window-major with
    ``window``)."""
    cfg = _config(patches_per_row, window)
    enc = cfg.encoders["vision"]
    patches = [np.ones((t * h * w, enc.patch_dim), np.float32) for t, h, w in grids]
    plan = npk.plan_rows([len(x) for x in patches], enc.patches_per_row, M2, npk.row_buckets(len(grids)))
    packed = npk.pack(patches, [_grid_coords(*g) for g in grids], plan, M2, window=window)
    b = {k: np.zeros((len(per_sample), seq_len), np.int32) for k in ("input_ids", "positions", "segment_ids",
                                                                      "span_ids")}
    b["labels"] = np.full((len(per_sample), seq_len), -100, np.int32)
    fi = np.full((len(per_sample), seq_len), -1, np.int32)
    for row, insts in enumerate(per_sample):
        cur = 1
        for span, i in enumerate(insts, 1):
            n = len(patches[i]) // M2
            b["input_ids"][row, cur:cur + n] = 3
            b["span_ids"][row, cur:cur + n] = span
            fi[row, cur:cur + n] = packed.feature_index[i]
            cur += n + 1
        b["segment_ids"][row, :cur] = 1
        b["positions"][row, :cur] = np.arange(cur)
    b["encoder_inputs"] = {"vision": packed.inputs}
    b["feature_index"] = {"vision": fi}
    return b, cfg


GRIDS = [(1, 4, 6), (2, 2, 4), (1, 4, 4)]


def test_check_batch_accepts_a_packed_batch():
    b, cfg = _native_batch(GRIDS)
    check_batch(b, cfg)


def test_check_batch_names_a_grid_that_does_not_match_its_placeholders():
    b, cfg = _native_batch(GRIDS)
    # One placeholder fewer than instance 2's grid: the run and the instance disagree.
    fi = b["feature_index"]["vision"]
    last = np.flatnonzero(fi[1] >= 0)[-1]
    b["input_ids"][1, last], fi[1, last], b["span_ids"][1, last] = 9, -1, 0
    with pytest.raises(ValueError, match=r"sample 1: 'vision' placeholder run of span 1 has 3 tokens but its "
                                         r"instance .* grid \(t, h, w\) = \(1, 4, 4\), i.e. 4 tokens"):
        check_batch(b, cfg)


def test_check_batch_names_a_run_spanning_two_instances_and_bad_layouts():
    b, cfg = _native_batch(GRIDS)
    b["span_ids"][0][b["span_ids"][0] == 2] = 1  # two instances' runs as one span
    with pytest.raises(ValueError, match="points at 2 packed instances"):
        check_batch(b, cfg)
    b, cfg = _native_batch(GRIDS)
    seg = b["encoder_inputs"]["vision"]["segment_ids"]
    r, a = np.argwhere(seg == 2)[0]
    seg[r, a:a + 2] = 1  # instance 2 now starts 2 patches late: not merge-aligned
    with pytest.raises(ValueError, match="must start at and span a multiple of merge_size"):
        check_batch(b, cfg)
    b, cfg = _native_batch(GRIDS)
    g = b["encoder_inputs"]["vision"]["grid"]
    g[0, 1] = g[0, 0]  # two patches with the same coordinate: not a full grid
    with pytest.raises(ValueError, match="is not a full \\(t, h, w\\) grid"):
        check_batch(b, cfg)
    b, cfg = _native_batch(GRIDS)
    b["encoder_inputs"]["vision"] = b["encoder_inputs"]["vision"]["patches"]
    with pytest.raises(ValueError, match="must be a dict with keys"):
        check_batch(b, cfg)


# ------------------------------------------------------------------------------------- window-major (Qwen2.5-VL)


@pytest.mark.parametrize("grid,window", [((1, 12, 20), 2), ((3, 8, 6), 2), ((1, 20, 12), 4), ((2, 4, 4), 4)])
def test_window_order_is_hf_window_index(grid, window):
    """window_order lays an instance out as transformers' get_vision_window_index permutes it (windows with partial
    ones at the edges, a video's temporal steps, a window larger than the image), from any input order; window 0
    keeps HF's processor order."""
    import torch
    from transformers.vision_utils import get_vision_window_index

    coords = _grid_coords(*grid)
    index, _ = get_vision_window_index(torch.tensor([grid]), 2, window * 4, 2)  # patch 2, merge 2
    hf = (index.numpy()[:, None] * M2 + np.arange(M2)).reshape(-1)  # HF's window order -> processor order
    np.testing.assert_array_equal(npk.window_order(coords, 2, window), hf)
    shuffled = np.random.default_rng(0).permutation(len(coords))
    np.testing.assert_array_equal(coords[shuffled][npk.window_order(coords[shuffled], 2, window)], coords[hf])
    np.testing.assert_array_equal(npk.window_order(coords, 2, 0), np.arange(len(coords)))
    if grid[1] > 2 * window or grid[2] > 2 * window:  # the test could fail: several windows reorder the units
        assert not np.array_equal(hf, np.arange(len(coords)))


WINDOW_GRIDS = [(1, 8, 12), (2, 4, 8), (1, 4, 4)]  # windows of 2 merged units: 2 x 3, 1 x 2 (x2), 1 window


def test_window_major_pack_keeps_merge_groups_and_feature_index_reads_tokens_in_raster_order():
    """Window-major packing: each window a contiguous run, every merge group whole, and each token's feature the
    merged unit at the token's own (t, row, column); check_batch accepts that and refuses raster feature_index on
    the permuted units or a merge group split across units."""
    b, cfg = _native_batch(WINDOW_GRIDS, seq_len=48, window=2, patches_per_row=128)
    check_batch(b, cfg)
    x = b["encoder_inputs"]["vision"]
    grid, fi = x["grid"].reshape(-1, 3), b["feature_index"]["vision"]
    units = grid[::M2] // [1, 2, 2]  # each packed feature's merged unit (t, row, column)
    groups = grid.reshape(-1, M2, 3)
    np.testing.assert_array_equal(groups // [1, 2, 2], np.repeat(units[:, None], M2, 1))  # groups whole
    for row, insts in enumerate(((0, 1), (2,))):
        cur = 1
        for i in insts:
            t, h, w = WINDOW_GRIDS[i]
            n = t * h * w // M2
            tt, rr, cc = np.meshgrid(np.arange(t), np.arange(h // 2), np.arange(w // 2), indexing="ij")
            raster = np.stack([tt, rr, cc], -1).reshape(-1, 3)
            np.testing.assert_array_equal(units[fi[row, cur:cur + n]], raster, err_msg=f"instance {i}")
            feats = fi[row, cur:cur + n]
            if i == 0:  # several windows: the packed units are not in raster order (the oracle could fail)
                assert not np.array_equal(feats, feats.min() + np.arange(n))
                bad = {**b, "feature_index": {"vision": fi.copy()}}
                bad["feature_index"]["vision"][row, cur:cur + n] = feats.min() + np.arange(n)
                with pytest.raises(ValueError, match=r"not that instance's features in token order"):
                    check_batch(bad, cfg)
            cur += n + 1
    bad = {**b, "encoder_inputs": {"vision": {**x, "grid": x["grid"].copy()}}}
    g = bad["encoder_inputs"]["vision"]["grid"]
    g[0, [1, 4]] = g[0, [4, 1]]  # one patch of unit 0 and one of unit 1 swapped: a full grid, groups broken
    with pytest.raises(ValueError, match=r"row 0: the instance at patch 0 has at patch 0 the grid .* not one merged "
                                         r"unit's 2x2 patches"):
        check_batch(bad, cfg)


def test_pack_instances_orders_by_the_towers_windows():
    """pack_instances (what the synthetic and real-data builders call) lays a Qwen2.5-VL tower's instances out
    window-major and a Qwen2-VL tower's in HF's order; feature_index follows."""
    grids = [(1, 8, 12), (1, 4, 4)]
    patches = [np.arange(t * h * w, dtype=np.float32)[:, None] for t, h, w in grids]  # each patch's HF index
    for window in (0, 2):
        enc = _config(128, window).encoders["vision"]
        packed = npk.pack_instances(patches, grids, enc)
        for i, g in enumerate(grids):
            r, o = divmod(int(packed.feature_base[i]) * M2, 128)
            n = len(patches[i])
            order = packed.inputs["patches"][r, o:o + n, 0].astype(np.int64)
            np.testing.assert_array_equal(order, npk.window_order(_grid_coords(*g), 2, window))
            np.testing.assert_array_equal(packed.feature_index[i],
                                          packed.feature_base[i] + np.argsort(order[::M2] // M2))
        assert (window == 0) == all(np.array_equal(f, f[0] + np.arange(len(f))) for f in packed.feature_index)


def test_placement_shards_packed_rows_by_the_encoder_batch_rule():
    import jax

    from mllm_jax.data.placement import put_batch
    from mllm_jax.parallel.config import ParallelConfig
    from mllm_jax.parallel.mesh import make_mesh

    mesh = make_mesh(ParallelConfig(data=2, fsdp=4))
    b, _ = _native_batch(GRIDS, per_sample=((0, 1), (2,)) * 4)
    inputs = b["encoder_inputs"]["vision"]
    b["encoder_inputs"]["vision"] = npk.pad_rows(inputs, 8)  # 8 rows: one per device
    placed = put_batch(b, mesh, leading=0)
    for key, x in placed["encoder_inputs"]["vision"].items():
        assert x.sharding.spec[0] == ("data", "fsdp"), (key, x.sharding.spec)
        np.testing.assert_array_equal(np.asarray(x)[:len(inputs[key])], inputs[key])
    assert placed["input_ids"].sharding.spec[0] == ("data", "fsdp")
    assert jax.device_count() == 8


# --------------------------------------------------------------------------------- synthetic native-resolution data


def _native_model(mrope=False, patches_per_row=256, **enc_kw):
    enc = NativeVisionConfig(patch_size=4, d_model=16, n_layers=1, n_heads=2, d_ff=32, min_pixels=16 * 16,
                             max_pixels=48 * 48, patches_per_row=patches_per_row, **enc_kw)
    llm = dict(vocab_size=80, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=32)
    if mrope:
        llm["mrope_section"] = (2, 1, 1)
    return ModelConfig(llm=LLMConfig(**llm), encoders={"vision": enc},
                       projectors={"vision": ProjectorConfig(kind="patch_merger")}, placeholder_ids={"vision": 3})


def _native_data(**kw):
    from mllm_jax.train.config import DataConfig

    return DataConfig(**{**dict(batch_size=4, seq_len=128, samples_per_row=2,
                                mixture={"image": 1.0, "video": 1.0, "text": 0.3}), **kw})


def test_synthetic_native_batches_are_valid_and_captions_match_the_pixels():
    import jax

    from mllm_jax.data import SyntheticBatches, synthetic

    mc = _native_model()
    data = SyntheticBatches(mc, _native_data(), microbatches=2)
    batch = data.batch_at(0)
    again = SyntheticBatches(mc, _native_data(), microbatches=2).batch_at(0)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(batch), jax.tree.leaves(again)))
    for m in range(2):
        check_batch(jax.tree.map(lambda x: x[m], batch), mc)
    seg = batch["encoder_inputs"]["vision"]["segment_ids"]
    pack = data.builder.last_pack["vision"]  # the last microbatch's count
    assert pack["padding"] == seg[1].size - pack["patches"] and pack["patches"] == (seg[1] > 0).sum()
    # Several sizes and videos among the first samples; a video's caption names the way its shape moves.
    grids, moves = set(), 0
    for i in range(40):
        s = data.sample(i)
        for _, x in s.media:
            grids.add(x.shape)
            if x.ndim == 4:
                first, last = [np.argwhere(f.max(-1) > 150).mean(0) for f in (x[0], x[-1])]  # (y, x) centroids
                motion = last - first
                assert s.answer.split()[-2] == "moving", s.answer
                direction = np.asarray(synthetic.VIDEO_MOTIONS[s.answer.split()[-1]])
                # It moves the way the caption says by at least a pixel a frame, and hardly across it.
                assert motion @ direction > len(x) - 1, (s.answer, motion)
                assert abs(motion @ direction[::-1]) < 1.0, (s.answer, motion)
                moves += 1
    # Every size the generator draws (blocks of patch x merge = 8 px a side) appears among the first 40 samples.
    blocks = lambda lo_hi: range(lo_hi[0], lo_hi[1] + 1)  # noqa: E731
    image, video = blocks(synthetic.NATIVE_IMAGE_BLOCKS), blocks(synthetic.NATIVE_VIDEO_BLOCKS)
    sizes = {(8 * h, 8 * w, 3) for h in image for w in image}
    sizes |= {(t, 8 * h, 8 * w, 3) for t in synthetic.NATIVE_VIDEO_FRAMES for h in video for w in video}
    assert grids == sizes and len(sizes) >= 5 and moves >= 5


def test_synthetic_batches_of_a_windowed_tower_are_window_major_and_valid():
    """BatchBuilder with a Qwen2.5-VL tower (windows of 2 merged units): the microbatches pass check_batch (merge
    groups whole, each token's feature its own unit) and some runs really read permuted units."""
    import jax

    from mllm_jax.data import SyntheticBatches

    mc = _native_model(kind="qwen2_5_vl", window_size=16, full_attention_layers=(0,))
    batch = SyntheticBatches(mc, _native_data(), microbatches=2).batch_at(0)
    permuted = 0
    for m in range(2):
        b = jax.tree.map(lambda x: x[m], batch)
        check_batch(b, mc)
        fi, span = b["feature_index"]["vision"], b["span_ids"]
        for r in range(len(fi)):
            for sp in np.unique(span[r][fi[r] >= 0]):
                f = fi[r][(span[r] == sp) & (fi[r] >= 0)]
                permuted += not np.array_equal(f, f.min() + np.arange(len(f)))
    assert permuted > 0


def test_native_image_captions_match_the_pixels():
    """Oracle: an image's colour and cell recomputed from its saturated pixels (the grey frame is not the shape)."""
    from mllm_jax.data import synthetic
    from mllm_jax.data.tokenizer import COLOURS, COLS, ROWS

    rgb = {c: np.asarray(synthetic._RGB[c]) for c in COLOURS}
    for i in range(30):
        s = synthetic.make_native_sample(synthetic.sample_rng(0, "train", i), "image", factor=8)
        img = s.media[0][1].astype(np.float32) / 255
        h, w = img.shape[:2]
        words = s.answer.split()
        shape_px = img.max(-1) - img.min(-1) > 0.4
        ys, xs = np.nonzero(shape_px)
        assert (ROWS[int(ys.mean() + 0.5) * 3 // h], COLS[int(xs.mean() + 0.5) * 3 // w]) == (words[5], words[6]), s.answer
        mean_rgb = img[shape_px].mean(0)
        assert min(COLOURS, key=lambda c: np.abs(mean_rgb / mean_rgb.max() - rgb[c]).sum()) == words[1], s.answer


def test_a_video_with_no_frames_and_a_tiny_image_are_named_or_resized():
    from mllm_jax.data import synthetic
    from mllm_jax.data.batching import BatchBuilder

    mc = _native_model()
    builder = BatchBuilder(mc, _native_data(samples_per_row=1))
    empty = synthetic.Sample("video", "<image> describe the image .", "a red circle moving left",
                             [("vision", np.zeros((0, 16, 16, 3), np.uint8))])
    ok = synthetic.make_native_sample(np.random.default_rng(0), "image", factor=8)
    with pytest.raises(ValueError, match=r"sample 1 \(video\): 'vision' item of shape \(0, 16, 16, 3\): video has no "
                                         r"frames"):
        builder.build([ok, empty])
    # Below min_pixels (16 x 16): resized up as transformers' smart_resize does, and its run matches the new grid.
    tiny = synthetic.Sample("image", "<image> describe the image .", "a red circle at the top left",
                            [("vision", np.full((4, 6, 3), 200, np.uint8))])
    batch = builder.build([ok, tiny])
    check_batch(batch, mc)
    seg = batch["encoder_inputs"]["vision"]["segment_ids"]
    assert (batch["input_ids"][1] == 3).sum() * 4 * 16 >= 16 * 16 and (seg > 0).sum() == (batch["input_ids"] == 3).sum() * 4


def test_encoder_balance_keeps_packed_rows():
    """Native rows stay as packed (the balancer moves whole instances of fixed-size towers only); the feature cache
    of native towers is tests/test_encoder_cache.py's."""
    import jax

    from mllm_jax.data import SyntheticBatches, encoder_balance
    from mllm_jax.parallel.config import ParallelConfig

    mc = _native_model()
    batch = SyntheticBatches(mc, _native_data(), microbatches=2).batch_at(0)
    out = encoder_balance.prepare(batch, mc, ParallelConfig(data=2, fsdp=4), "balanced", leading=1)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(batch)))


@pytest.mark.parametrize("kind,tps", [("qwen2_vl", 0.0), ("qwen2_5_vl", 4.0)])
def test_rope_positions_of_packed_samples_equal_each_sample_alone_and_move_with_the_context_permutation(kind, tps):
    import jax

    from mllm_jax.data import SyntheticBatches
    from mllm_jax.data.context_batches import permute_for_context
    from mllm_jax.parallel.config import ContextConfig, ParallelConfig

    mc = _native_model(mrope=True, kind=kind, tokens_per_second=tps)
    sec = mc.encoders["vision"].temporal_patch_size / mc.encoders["vision"].fps  # frames drawn at the tower's fps
    batch = jax.tree.map(lambda x: x[0], SyntheticBatches(mc, _native_data(samples_per_row=3, seq_len=256,
                                                                          batch_size=2)).batch_at(1))
    check_batch(batch, mc)
    inputs = batch["encoder_inputs"]["vision"]
    p = inputs["segment_ids"].shape[1]
    checked = 0
    for b in range(2):
        for seg in range(1, 4):
            cols = np.flatnonzero(batch["segment_ids"][b] == seg)
            ids, fi = batch["input_ids"][b, cols], batch["feature_index"]["vision"][b, cols]
            types_, images, videos = np.zeros(len(cols), int), [], []
            for sp in np.unique(batch["span_ids"][b, cols][ids == 3]):
                run = (batch["span_ids"][b, cols] == sp) & (ids == 3)
                r, o = divmod(int(fi[run][0]) * M2, p)  # the instance's first patch
                thw = tuple(int(v) + 1 for v in inputs["grid"][r, o:o + run.sum() * M2].max(0))
                types_[run] = 1 if thw[0] == 1 else 2
                (images if thw[0] == 1 else videos).append(thw)
            hf = _hf_rope_index(kind, ids.tolist(), types_.tolist(), images, videos, [sec] * len(videos), tps)
            np.testing.assert_array_equal(batch["rope_positions"][b, cols], hf)
            checked += bool(videos) + bool(images)
    assert checked >= 3
    pc = ParallelConfig(context=2, context_config=ContextConfig(mode="balanced", block=32))
    permuted, plan = permute_for_context(batch, pc, leading=0)
    perm = plan.permutation
    live = perm >= 0
    src = np.take_along_axis(batch["rope_positions"], np.maximum(perm, 0)[..., None], axis=1)
    np.testing.assert_array_equal(permuted["rope_positions"][live], src[live])
    assert not np.array_equal(perm[0, :len(perm[0]) // 2], np.arange(len(perm[0]) // 2))  # it really moved tokens


def test_an_instance_larger_than_a_row_names_its_sample_and_hosts_cannot_build_part_of_a_microbatch():
    from mllm_jax.data import SyntheticBatches, synthetic
    from mllm_jax.data.batching import BatchBuilder, local_synthetic_batch

    mc = _native_model(patches_per_row=64)
    small = synthetic.Sample("image", "<image> describe the image .", "a red circle at the top left",
                             [("vision", np.full((24, 32, 3), 90, np.uint8))])  # 6 x 8 = 48 patches: fits
    big = synthetic.Sample("image", "<image> describe the image .", "a red circle at the top left",
                           [("vision", np.full((48, 40, 3), 90, np.uint8))])  # 12 x 10 = 120 patches
    builder = BatchBuilder(mc, _native_data(samples_per_row=1))
    check_batch(builder.build([small, small]), mc)
    with pytest.raises(ValueError, match=r"sample 1: a 'vision' item of grid \(t, h, w\) = \(1, 12, 10\) has 120 "
                                         r"patches, more than a packed row holds"):
        builder.build([small, big])
    data = SyntheticBatches(_native_model(), _native_data())
    with pytest.raises(ValueError, match="building only rows slice\\(0, 1, None\\) of 4"):
        local_synthetic_batch(data, 0, slice(0, 1))


def test_a_native_tower_beside_a_fixed_size_audio_encoder():
    """Audio clips keep their fixed rows and runs (and count as text for M-RoPE); images and videos are packed."""
    import jax

    from mllm_jax.config import AudioConfig
    from mllm_jax.data import SyntheticBatches

    base = _native_model(mrope=True)
    mc = base.replace(encoders={**base.encoders, "audio": AudioConfig(n_mels=8, max_source_positions=6)},
                      projectors={**base.projectors, "audio": ProjectorConfig()},
                      placeholder_ids={"vision": 3, "audio": 4})
    batch = SyntheticBatches(mc, _native_data(mixture={"image": 1.0, "video": 1.0, "audio": 1.0})).batch_at(0)
    one = jax.tree.map(lambda x: x[0], batch)
    check_batch(one, mc)
    assert one["encoder_inputs"]["audio"].shape == (8, 12, 8) and (one["feature_index"]["audio"] >= 0).any()
    is_audio = one["input_ids"] == 4
    rp = one["rope_positions"][is_audio]
    assert (rp[:, 0] == rp[:, 1]).all() and (rp[:, 1] == rp[:, 2]).all()
