"""Real LLaVA JSON for a native-resolution tower (docs/data.md, docs/native_resolution.md): PNG images of several sizes,
a folder-of-frames video and a .npy video go through the Loader into packed patch rows. Oracles: the Qwen2-VL
processor on each instance alone (patches, grid), native_pack.rope_positions on each sample alone, check_batch, and
the data=8 run's losses for data=2 x fsdp=2 x context=2; bad inputs are counted by reason."""

import dataclasses
import json
import os

import gin
import numpy as np
import pytest
from PIL import Image

from mllm_jax.batch import check_batch
from mllm_jax.data import native_pack
from mllm_jax.data.datasets import DatasetConfig, Loader, make_source
from mllm_jax.data.processor.native_vision import NativeVisionProcessor, patch_grid
from mllm_jax.data.tokenizer import build_tokenizer

RECIPE = "configs/qwen2vl_tiny.gin"
WORDS = ("red", "green", "blue", "yellow")


def recipe_model():
    from mllm_jax.train import loop

    try:
        return loop.load_run_config([RECIPE], []).model
    finally:
        gin.clear_config()


def _rgb(rng, h, w):
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def write_dataset(root, *, bad=True):
    """Records: images of 24x40, 48x32, 20x28 (resized to 24x24), 8x8 (scaled up to min_pixels); a 6-frame folder
    video at 4 fps (4 frames kept) and a 5-frame .npy video (no fps: every frame kept); two media in one sample;
    text only. ``bad``: an empty frame folder, a .npy of no frames, a corrupt PNG (found while decoding), a video
    larger than a patch row. Returns (json path, {id: [(kind, path, fps)]})."""
    rng = np.random.default_rng(0)
    os.makedirs(root / "media" / "clip", exist_ok=True)
    os.makedirs(root / "media" / "empty", exist_ok=True)
    media = {}
    for name, (h, w) in {"a": (24, 40), "b": (48, 32), "c": (20, 28), "d": (8, 8)}.items():
        Image.fromarray(_rgb(rng, h, w)).save(root / "media" / f"{name}.png")
    for k in range(6):
        Image.fromarray(_rgb(rng, 24, 32)).save(root / "media" / "clip" / f"f{k:02d}.png")
    np.save(root / "media" / "v.npy", rng.integers(0, 256, (5, 32, 24, 3), dtype=np.uint8))
    np.save(root / "media" / "none.npy", np.zeros((0, 16, 16, 3), np.uint8))
    np.save(root / "media" / "big.npy", rng.integers(0, 256, (8, 48, 48, 3), dtype=np.uint8))
    with open(root / "media" / "corrupt.png", "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)

    def rec(i, text, answer, image=(), video=(), fps=None):
        r = {"id": f"s{i}", "conversations": [{"from": "human", "value": text}, {"from": "gpt", "value": answer}]}
        if image:
            r["image"] = list(image)
        if video:
            r["video"] = list(video)
        if fps is not None:
            r["fps"] = fps
        media[f"s{i}"] = ([("image", p, None) for p in image], [("video", p, fps) for p in video])
        return r

    records = []
    for rep in range(2):
        k = 10 * rep
        w = WORDS[rep]
        records += [
            rec(k + 0, "<image> describe the image .", f"a {w} circle", image=["a.png"]),
            rec(k + 1, "describe <image> .", f"a {w} square at the top", image=["b.png"]),
            rec(k + 2, "<image> describe the image .", f"a {w} circle at the left", image=["c.png"]),
            rec(k + 3, "<image> describe .", f"a {w} square", image=["d.png"]),
            rec(k + 4, "<video> describe .", f"a {w} circle from the left", video=["clip"], fps=4),
            rec(k + 5, "<video> describe .", f"a {w} square from the top", video=["v.npy"]),
            rec(k + 6, "<video> then <image> .", f"a {w} circle", image=["a.png"], video=["clip"], fps=4),
            rec(k + 7, "count from four :", "five six seven"),
        ]
    if bad:
        records += [rec(90, "<video> describe .", "a red circle", video=["empty"]),
                    rec(91, "<video> describe .", "a red circle", video=["none.npy"]),
                    rec(92, "<image> describe .", "a red circle", image=["corrupt.png"]),
                    rec(93, "<video> describe .", "a red circle", video=["big.npy"])]
    path = root / "llava.json"
    path.write_text(json.dumps(records))
    return str(path), media


def dataset_config(path, **kw):
    base = dict(format="llava", path=path, media_root=os.path.join(os.path.dirname(path), "media"),
                global_batch_samples=8, rows_per_microbatch=1, seq_len_buckets=(128, 256),
                instance_buckets=(1, 2, 3, 4), num_workers=1, prefetch=1, shuffle=False)
    return DatasetConfig(**(base | kw))


def oracle(processor, root, kind, path, fps):
    """The processor on the instance alone, from all its pixels."""
    full = os.path.join(root, "media", path)
    if kind == "image":
        return processor.image(np.asarray(Image.open(full).convert("RGB"))), False
    if os.path.isdir(full):
        frames = np.stack([np.asarray(Image.open(os.path.join(full, f)).convert("RGB")) for f in sorted(os.listdir(full))])
    else:
        frames = np.load(full)
    return processor.video(frames, video_fps=fps), True


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("native")
    path, media = write_dataset(root)
    # tokens_per_second: the Qwen2.5-VL video time interval, so the rope oracle checks seconds_per_grid too
    mc = recipe_model()
    mc = dataclasses.replace(mc, encoders={"vision": dataclasses.replace(mc.encoders["vision"],
                                                                          tokens_per_second=2.0)})
    return root, path, media, mc


def _by_sample(batch, ids_per_mb, m, lr, rows):
    """(sample id, row, token columns) of each sample the loader put in rank ``lr``'s rows of microbatch ``m``."""
    out, k = [], 0
    ids = ids_per_mb[m][lr]
    for r in range(lr * rows, (lr + 1) * rows):
        seg = batch["segment_ids"][m, r]
        for s in range(1, seg.max() + 1):
            out.append((ids[k], r, np.flatnonzero(seg == s)))
            k += 1
    assert k == len(ids)
    return out


def test_loader_packs_each_instance_as_the_processor_alone_with_per_sample_mrope(setup):
    root, path, media, mc = setup
    enc = mc.encoders["vision"]
    processor = NativeVisionProcessor.for_model(enc)
    cfg = dataset_config(path, video_fps=0.0)
    tok = build_tokenizer()
    seen, n_batches = set(), 3
    with Loader(make_source(cfg, tok, mc), cfg, mc, num_data_ranks=2, microbatches=2, process_index=0,
                process_count=1) as loader:
        for _ in range(n_batches):
            batch = next(loader)
            ids = loader.last_sample_ids
            r_patch = batch["encoder_inputs"]["vision"]["segment_ids"].shape[1] // 2
            for m in range(2):
                mb = {k: (v[m] if not isinstance(v, dict) else {n: (a[m] if not isinstance(a, dict) else
                                                                    {q: b[m] for q, b in a.items()})
                                                                for n, a in v.items()}) for k, v in batch.items()}
                check_batch(mb, mc)
                rows = mb["encoder_inputs"]["vision"]
                for lr in range(2):
                    for sid, r, cols in _by_sample(batch, ids, m, lr, 1):
                        seen.add(sid)
                        images, videos = media[sid]
                        order = iter(images), iter(videos)
                        text = [t for t in json.loads(open(path).read()) if t["id"] == sid][0]
                        markers = [w for w in text["conversations"][0]["value"].split() if w in ("<image>", "<video>")]
                        fi = mb["feature_index"]["vision"][r, cols]
                        runs = np.flatnonzero(fi >= 0)
                        spans, start = [], 0
                        for mk in markers:
                            alone, is_video = oracle(processor, root, *next(order[mk == "<video>"]))
                            n_tok = native_pack.instance_tokens(alone.grid_thw, enc.spatial_merge_size)
                            run = runs[start:start + n_tok]
                            start += n_tok
                            f0 = int(fi[run[0]])
                            np.testing.assert_array_equal(fi[run], f0 + np.arange(n_tok))
                            # the run's features are this rank's patch rows (data rank lr owns rows lr*R..)
                            row, off = divmod(f0 * enc.merge_units, enc.patches_per_row)
                            assert lr * r_patch <= row < (lr + 1) * r_patch
                            n = len(alone.patches)
                            np.testing.assert_array_equal(rows["patches"][row, off:off + n], alone.patches)
                            np.testing.assert_array_equal(rows["grid"][row, off:off + n],
                                                          patch_grid(alone.grid_thw, enc.spatial_merge_size))
                            assert len(set(rows["segment_ids"][row, off:off + n])) == 1
                            spans.append((int(run[0]), alone.grid_thw,
                                          native_pack.time_interval(enc, alone, is_video)))
                        assert start == len(runs)
                        want = native_pack.rope_positions(len(cols), spans, enc.spatial_merge_size)
                        np.testing.assert_array_equal(mb["rope_positions"][r, cols], want)
        bad = loader.bad_sample_counts
    # every good record was seen; the bad ones counted by reason (the corrupt PNG by this, the decoding, host)
    assert {f"s{k + i}" for k in (0, 10) for i in range(8)} <= seen
    assert bad["bad_video"] >= 2 and bad["instance_too_large"] >= 1 and bad["corrupt_file"] >= 1, bad
    assert not {s for s in seen if s.startswith("s9")} - {"s92"}  # s92 is planned, then dropped while decoding


def test_planned_grids_and_kept_frames_equal_the_processors(setup):
    """The header-only plan (native_pack.image_grid / video_plan) gives the processor's grid, and its kept frames
    through the processor without a rate give the patches and seconds_per_grid of the processor sampling itself."""
    root, _, _, mc = setup
    processor = NativeVisionProcessor.for_model(mc.encoders["vision"])
    for h, w in ((24, 40), (48, 32), (20, 28), (8, 8), (300, 4)):
        assert native_pack.image_grid(processor, h, w) == processor.image(np.zeros((h, w, 3), np.uint8)).grid_thw
    rng = np.random.default_rng(1)
    for t, fps in ((6, 4.0), (5, None), (9, 30.0), (1, None), (13, 2.0)):
        clip = rng.integers(0, 256, (t, 24, 32, 3), dtype=np.uint8)
        keep, grid, spg = native_pack.video_plan(processor, t, 24, 32, fps)
        alone = processor.video(clip, video_fps=fps)
        kept = processor.video(clip[keep])
        assert grid == alone.grid_thw == kept.grid_thw and spg == pytest.approx(alone.seconds_per_grid)
        np.testing.assert_array_equal(kept.patches, alone.patches)
    with pytest.raises(ValueError, match="no frames"):
        native_pack.video_plan(processor, 0, 24, 32, None)


def test_bad_inputs_raise_naming_the_sample_under_on_bad_sample_raise(setup):
    root, path, _, mc = setup
    src = make_source(dataset_config(path, on_bad_sample="raise"), build_tokenizer(), mc)
    ids = [src.sample_id(i) for i in range(len(src))]
    from mllm_jax.data.datasets import BadSampleError

    for sid, reason, text in (("s90", "bad_video", "has no frames"), ("s91", "bad_video", "has no frames"),
                              ("s93", "instance_too_large", r"\(4, 12, 12\) has 576 patches")):
        with pytest.raises(BadSampleError, match=f"{sid}.*{reason}.*{text}"):
            src.prepare(ids.index(sid))
    with pytest.raises(BadSampleError, match="s92.*corrupt_file"):
        src.materialize(src.prepare(ids.index("s92")))
    # a run whose text and media disagree
    rec = {"id": "x", "image": ["a.png"], "conversations": [{"from": "human", "value": "<video> hi"},
                                                            {"from": "gpt", "value": "a"}]}
    src.records.append(rec)
    with pytest.raises(BadSampleError, match="placeholder_mismatch"):
        src.prepare(len(src) - 1)
    # instances that need more patch rows than the largest bucket: 96 + 144 + 60 patches > one row of 256
    one_row = make_source(dataset_config(path, on_bad_sample="raise", instance_buckets=(1,)), build_tokenizer(), mc)
    one_row.records.append({"id": "many", "image": ["b.png", "a.png"], "video": ["v.npy"], "conversations": [
        {"from": "human", "value": "<image> <video> <image>"}, {"from": "gpt", "value": "a"}]})
    with pytest.raises(BadSampleError, match=r"many.*too_many_instances.*\[96, 144, 60\] patches need 2 patch rows"):
        one_row.prepare(len(one_row) - 1)
    # a file that changed size between planning and decoding: its grid no longer matches its run
    Image.fromarray(np.zeros((24, 24, 3), np.uint8)).save(root / "media" / "changing.png")
    src.records.append({"id": "changed", "image": "changing.png", "conversations": [
        {"from": "human", "value": "<image>"}, {"from": "gpt", "value": "a"}]})
    planned = src.prepare(len(src) - 1)
    Image.fromarray(np.zeros((40, 24, 3), np.uint8)).save(root / "media" / "changing.png")
    with pytest.raises(BadSampleError, match=r"changed.*grid_mismatch.*\(1, 10, 6\).*planned \(1, 6, 6\)"):
        src.materialize(planned)


def _flat(batch):
    return {f"{k}/{n}/{q}" if isinstance(a, dict) else f"{k}/{n}": (a[q] if isinstance(a, dict) else a)
            for k, v in batch.items() for n, a in (v.items() if isinstance(v, dict) else [("", v)])
            for q in (a if isinstance(a, dict) else [None])}


def test_host_blocks_concatenate_to_the_single_host_batch(setup):
    """Two hosts, each decoding its data rank only: their blocks (patch rows, feature_index global) are the one-host
    batch's halves along the row axis."""
    _, path, _, mc = setup
    cfg = dataset_config(path)

    def first(pi, pc):
        with Loader(make_source(cfg, build_tokenizer(), mc), cfg, mc, num_data_ranks=2, microbatches=2,
                    process_index=pi, process_count=pc) as loader:
            return _flat(next(loader))

    whole, a, b = first(0, 1), first(0, 2), first(1, 2)
    assert set(whole) == set(a) == set(b) and "encoder_inputs/vision/patches" in whole
    for k in whole:
        np.testing.assert_array_equal(np.concatenate([a[k], b[k]], axis=1), whole[k], err_msg=k)


@pytest.mark.parametrize("method", ["balanced", "sequential", "random"])
def test_microbatch_patches_fit_one_patch_row_under_every_assignment(setup, method):
    """With one patch row per rank and microbatch (instance_buckets=(1,)), planning puts no more patches in a
    microbatch than the row holds, for every assignment method (the balancer prices and limits by patches)."""
    _, path, _, mc = setup
    cfg = dataset_config(path, instance_buckets=(1,), microbatch_assignment=method)
    with Loader(make_source(cfg, build_tokenizer(), mc), cfg, mc, num_data_ranks=2, microbatches=2,
                process_index=0, process_count=1) as loader:
        for _ in range(3):
            batch = next(loader)
            seg = batch["encoder_inputs"]["vision"]["segment_ids"]
            assert seg.shape[:2] == (2, 2)  # [M, D * 1 row]
            for m in range(2):
                mb = {k: (v[m] if not isinstance(v, dict) else {n: (a[m] if not isinstance(a, dict) else
                                                                    {q: b[m] for q, b in a.items()})
                                                                for n, a in v.items()}) for k, v in batch.items()}
                check_batch(mb, mc)
            assert (seg > 0).sum() > 0


def test_processor_from_a_hf_preprocessor_config(setup, tmp_path):
    _, path, _, mc = setup
    enc = mc.encoders["vision"]
    conf = {"image_processor_type": "Qwen2VLImageProcessor", "patch_size": enc.patch_size,
            "temporal_patch_size": enc.temporal_patch_size, "merge_size": enc.spatial_merge_size,
            "min_pixels": 1024, "max_pixels": 1600}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(conf))
    src = make_source(dataset_config(path, processor_path=str(tmp_path)), build_tokenizer(), mc)
    assert (src.processor.min_pixels, src.processor.max_pixels) == (1024, 1600)
    ids = [src.sample_id(i) for i in range(len(src))]
    # 8x8 is scaled up to min_pixels = 1024 (32x32: 8x8 patches); 24x40 up to 32x48 (the model's bounds keep it)
    assert src.prepare(ids.index("s3")).instances[0].grid == (1, 8, 8)
    x = src.materialize(src.prepare(ids.index("s0")))
    assert x.prepared.instances[0].grid == tuple(x.encoder_inputs[0].grid_thw) == (1, 8, 12)
    assert x.prepared.instances[0].length == 24 and (x.prepared.input_ids == 3).sum() == 24
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(conf | {"patch_size": 14}))
    with pytest.raises(ValueError, match=r"processor_path.*\(14, 2, 2\).*\(4, 2, 2\)"):
        make_source(dataset_config(path, processor_path=str(tmp_path)), build_tokenizer(), mc)


def test_a_pretrained_runs_processor_comes_from_its_checkpoint_directory(setup, tmp_path):
    """train.py's real data (RealTrainData) for a run from pretrained weights: the processor is read from the
    checkpoint directory's preprocessor_config.json; DatasetConfig.processor_path overrides it; none: the tower's."""
    from mllm_jax.parallel.config import ParallelConfig
    from mllm_jax.data.train_data import RealTrainData
    from mllm_jax.hf.recipe import PretrainedConfig

    _, path, _, mc = setup
    enc = mc.encoders["vision"]
    for d, lo in (("ckpt", 1024), ("other", 512)):
        (tmp_path / d).mkdir()
        (tmp_path / d / "preprocessor_config.json").write_text(json.dumps({
            "image_processor_type": "Qwen2VLImageProcessor", "patch_size": 4, "temporal_patch_size": 2,
            "merge_size": 2, "min_pixels": lo, "max_pixels": 1600}))
    cases = ((PretrainedConfig(model=str(tmp_path / "ckpt")), "", 1024),
             (PretrainedConfig(model=str(tmp_path / "ckpt")), str(tmp_path / "other"), 512),
             (PretrainedConfig(encoders={"vision": str(tmp_path / "ckpt")}), "", 1024),
             (PretrainedConfig(model=str(tmp_path)), "", enc.min_pixels),  # no preprocessor_config.json there
             (None, "", enc.min_pixels))
    for pretrained, override, want in cases:
        data = RealTrainData(dataset_config(path, processor_path=override), build_tokenizer(), mc, ParallelConfig(),
                             pretrained=pretrained)
        try:
            assert data.source.processor.min_pixels == want, (pretrained, want)
        finally:
            data.close()


def test_the_balancer_prices_each_sample_from_its_instances_grids(setup):
    """What the loader hands the workload model: each sample's token count and, for the native modality, its
    instances' grids as the processor makes them (the oracle: the processor on each file alone)."""
    from mllm_jax.data.datasets import WorkloadModel

    root, path, media, mc = setup
    processor = NativeVisionProcessor.for_model(mc.encoders["vision"])
    calls = []

    class Recording(WorkloadModel):
        def workloads(self, tokens, instances):
            calls.append((list(tokens), [dict(i) for i in instances]))
            return super().workloads(tokens, instances)

    cfg = dataset_config(path)
    src = make_source(cfg, build_tokenizer(), mc)
    loader = Loader(src, cfg, mc, num_data_ranks=2, microbatches=2, process_index=0, process_count=1,
                    workload_model=Recording(mc))
    try:
        plan = loader.plan({"epoch": 0, "position": 0})
    finally:
        loader.close()
    tokens, instances = calls[-1]
    assert tokens == [s.num_tokens for s in plan.samples]
    for s, inst in zip(plan.samples, instances):
        images, videos = media[s.sample_id]
        text = [t for t in json.loads(open(path).read()) if t["id"] == s.sample_id][0]["conversations"][0]["value"]
        order = iter(images), iter(videos)
        want = [oracle(processor, root, *next(order[w == "<video>"]))[0].grid_thw for w in text.split()
                if w in ("<image>", "<video>")]
        assert [tuple(g) for g in inst["vision"]] == want, s.sample_id
    # a bigger grid costs more encoder work (priced at its own size, not per instance)
    w = Recording(mc)
    assert w.encoder_flops("vision", [(1, 12, 8)]) > w.encoder_flops("vision", [(1, 4, 4)]) > 0


def test_a_dropped_samples_instances_keep_their_planned_slots_empty(setup):
    """native_pack.pack_instances(reserve=...) (what the writer does for a sample dropped while decoding): the others
    sit exactly where the plan of all of them put them, in the same rows; the dropped one's slots are empty."""
    _, _, _, mc = setup
    enc = mc.encoders["vision"]
    rng = np.random.default_rng(2)
    grids = [(1, 12, 8), (2, 6, 8), (1, 6, 10), (3, 8, 6), (1, 4, 4)]
    patches = [rng.standard_normal((int(np.prod(g)), enc.patch_dim)).astype(np.float32) for g in grids]
    for drop in range(len(grids)):
        keep = [i for i in range(len(grids)) if i != drop]
        # the plan of all of them, the dropped one last (as the writer lists reserved instances)
        full = native_pack.pack_instances([patches[i] for i in keep + [drop]], [grids[i] for i in keep + [drop]],
                                          enc, buckets=(1, 2, 3))
        got = native_pack.pack_instances([patches[i] for i in keep], [grids[i] for i in keep], enc,
                                         buckets=(1, 2, 3), reserve=[len(patches[drop])])
        np.testing.assert_array_equal(got.feature_base, full.feature_base[:-1])
        assert got.inputs["patches"].shape == full.inputs["patches"].shape
        assert got.used == full.used - len(patches[drop]) and got.padding == full.padding + len(patches[drop])
        row, off = divmod(int(full.feature_base[-1]) * enc.merge_units, enc.patches_per_row)
        assert (got.inputs["segment_ids"][row, off:off + len(patches[drop])] == 0).all()
        for k, i in enumerate(keep):
            r, o = divmod(int(full.feature_base[k]) * enc.merge_units, enc.patches_per_row)
            np.testing.assert_array_equal(got.inputs["patches"][r, o:o + len(patches[i])], patches[i])


@pytest.mark.slow
def test_native_llava_json_trains_under_data_fsdp_context_like_data8(tmp_path):
    path, _ = write_dataset(tmp_path, bad=False)
    tokenizer = tmp_path / "tokenizer.json"
    build_tokenizer().save(str(tokenizer))
    from tests.train_main import losses, run_main

    params = [
        "LLMConfig.n_layers = 2", "LLMConfig.d_model = 32", "LLMConfig.n_heads = 2", "LLMConfig.n_kv_heads = 2",
        "LLMConfig.d_ff = 64", "NativeVisionConfig.n_layers = 1", "NativeVisionConfig.d_model = 16",
        "NativeVisionConfig.n_heads = 2", "NativeVisionConfig.d_ff = 32",
        f'DatasetConfig.path = "{path}"', f'DatasetConfig.media_root = "{tmp_path / "media"}"',
        'DatasetConfig.format = "llava"', "DatasetConfig.global_batch_samples = 16",
        "DatasetConfig.seq_len_buckets = (128,)", "DatasetConfig.instance_buckets = (1, 2, 3, 4)",
        "DatasetConfig.num_workers = 1",
        f'DataConfig.tokenizer_path = "{tokenizer}"', "DataConfig.eval_batches = 0",
        "OptimizerConfig.warmup_steps = 1", "OptimizerConfig.learning_rate = 1e-2", "TrainConfig.steps = 2",
        "TrainConfig.log_every = 1", "TrainConfig.eval_every = 0", "TrainConfig.progress_bar = False",
        "TrainConfig.checkpoint_every = 100", "CheckpointConfig.async_save = False",
    ]
    # The same 16 samples a step (the loader draws them in order whatever the layout): 8 data ranks of one 128-token
    # row, or 4 (data x fsdp) of two; per-sample losses do not depend on which samples share a row.
    ref = run_main(str(tmp_path / "data8"), params + ["ParallelConfig.data = 8", "DatasetConfig.rows_per_microbatch = 1"],
                   gin_file=RECIPE)
    layout = ["ParallelConfig.data = 2", "ParallelConfig.fsdp = 2", "ParallelConfig.context = 2",
              "ContextConfig.block = 16", 'ContextConfig.mode = "balanced"', "DatasetConfig.rows_per_microbatch = 2"]
    got = run_main(str(tmp_path / "cp"), params + layout, gin_file=RECIPE)
    ref_l, got_l = losses(ref), losses(got)
    assert sorted(ref_l) == sorted(got_l) == [1, 2] and all(np.isfinite(list(ref_l.values())))
    np.testing.assert_allclose([got_l[s] for s in ref_l], [ref_l[s] for s in ref_l], rtol=2e-5)
    assert all(0 <= r["patch_padding"] < 1 for r in ref), ref  # native patch rows were trained on
