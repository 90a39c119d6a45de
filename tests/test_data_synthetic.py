"""The synthetic multimodal data: deterministic per seed, batches in the contract format, labels and feature_index
consistent with the token stream (checked against the samples' own captions, not against stored values)."""

import numpy as np
import pytest

from mllm_jax.config import AudioConfig, LLMConfig, ModelConfig, ProjectorConfig, VisionConfig
from mllm_jax.data import IGNORE, SyntheticBatches, TextCodec, check_placeholders, feature_counts
from mllm_jax.data import synthetic
from mllm_jax.data.batching import unstack_first
from mllm_jax.data.tokenizer import COLOURS, COLS, MOTIONS, ROWS, SHAPES
from mllm_jax.train.config import DataConfig


def _model(audio=True, resampler=False):
    encoders = {"vision": VisionConfig(image_size=24, patch_size=6)}
    projectors = {"vision": ProjectorConfig(kind="resampler", num_queries=5) if resampler else ProjectorConfig()}
    placeholders = {"vision": 3}
    if audio:
        encoders["audio"] = AudioConfig(n_mels=8, max_source_positions=6)
        projectors["audio"] = ProjectorConfig()
        placeholders["audio"] = 4
    return ModelConfig(llm=LLMConfig(vocab_size=80), encoders=encoders, projectors=projectors,
                       placeholder_ids=placeholders)


def _data(**kw):
    base = dict(batch_size=6, seq_len=64, mixture={"image": 1.0, "audio": 1.0, "text": 1.0})
    base.update(kw)
    return DataConfig(**base)


def _equal_trees(a, b):
    import jax

    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return jax.tree.structure(a) == jax.tree.structure(b) and all(np.array_equal(x, y) for x, y in zip(la, lb))


def test_deterministic_per_seed_and_distinct_across_seeds_and_splits():
    mc = _model()
    a = SyntheticBatches(mc, _data(seed=1)).batch_at(3)
    b = SyntheticBatches(mc, _data(seed=1)).batch_at(3)
    c = SyntheticBatches(mc, _data(seed=2)).batch_at(3)
    d = SyntheticBatches(mc, _data(seed=1), split="eval").batch_at(3)
    assert _equal_trees(a, b)
    assert not np.array_equal(a["encoder_inputs"]["vision"], c["encoder_inputs"]["vision"])
    assert not np.array_equal(a["encoder_inputs"]["vision"], d["encoder_inputs"]["vision"])


def test_iterator_state_resumes_the_same_stream():
    mc = _model()
    it = SyntheticBatches(mc, _data())
    for _ in range(2):
        next(it)
    state = it.state()
    expected = next(it)
    fresh = SyntheticBatches(mc, _data())
    fresh.restore(state)
    assert _equal_trees(next(fresh), expected)
    with pytest.raises(ValueError, match="seed"):
        SyntheticBatches(mc, _data(seed=5)).restore(state)


def test_mixture_warmup_draws_the_first_steps_from_its_own_mixture():
    """A curriculum: the train stream's first mixture_warmup_steps steps hold only the warmup mixture's tasks, every
    later sample is the one the stream without a curriculum holds (same task, same content), and held-out streams
    never warm up."""
    mc, k, b = _model(), 2, 6
    cfg = _data(samples_per_row=k, mixture_warmup={"text": 1.0}, mixture_warmup_steps=3)
    plain = SyntheticBatches(mc, _data(samples_per_row=k))
    warm = SyntheticBatches(mc, cfg)
    per_step = b * k
    tasks = [[warm.sample(s * per_step + i).task for i in range(per_step)] for s in range(6)]
    assert all(t == ["text"] * per_step for t in tasks[:3]), tasks[:3]
    later = [plain.sample(i) for i in range(3 * per_step, 6 * per_step)]
    assert [t for step in tasks[3:] for t in step] == [s.task for s in later]
    assert {s.task for s in later} == {"image", "audio", "text"}
    assert [warm.sample(i).answer for i in range(3 * per_step, 6 * per_step)] == [s.answer for s in later]
    assert _equal_trees(warm.batch_at(4), plain.batch_at(4))
    assert (unstack_first(warm.batch_at(0))["feature_index"]["vision"] < 0).all()  # no image in a text-only step
    held = SyntheticBatches(mc, cfg, split="eval")
    assert _equal_trees(held.batch_at(0), SyntheticBatches(mc, _data(samples_per_row=k), split="eval").batch_at(0))
    with pytest.raises(ValueError, match=r"mixture_warmup \(\{\}\) and mixture_warmup_steps \(2\)"):
        SyntheticBatches(mc, _data(mixture_warmup_steps=2))
    with pytest.raises(ValueError, match="mixture_warmup with epoch_samples \\(64\\)"):
        SyntheticBatches(mc, _data(mixture_warmup={"text": 1.0}, mixture_warmup_steps=2, epoch_samples=64))
    with pytest.raises(ValueError, match="mixture_warmup asks for 'audio' samples but the model has no 'audio'"):
        SyntheticBatches(_model(audio=False), _data(mixture={"image": 1.0}, mixture_warmup={"audio": 1.0},
                                                    mixture_warmup_steps=2))


def test_microbatches_partition_the_global_batch():
    """Each microbatch is the matching slice of the one-microbatch batch, with feature_index rebased to its rows."""
    mc = _model()
    whole = unstack_first(SyntheticBatches(mc, _data()).batch_at(0))
    split = SyntheticBatches(mc, _data(), microbatches=3).batch_at(0)
    counts = feature_counts(mc)
    for m in range(3):
        rows = slice(2 * m, 2 * m + 2)
        for key in ("input_ids", "labels", "positions", "segment_ids", "span_ids"):
            np.testing.assert_array_equal(split[key][m], whole[key][rows])
        for name in mc.encoders:
            np.testing.assert_array_equal(split["encoder_inputs"][name][m], whole["encoder_inputs"][name][rows])
            f_whole = whole["feature_index"][name][rows]
            shift = 2 * m * counts[name]
            np.testing.assert_array_equal(split["feature_index"][name][m], np.where(f_whole >= 0, f_whole - shift, -1))
    with pytest.raises(ValueError, match="batch_size \\(6\\).*microbatches \\(4\\)"):
        SyntheticBatches(mc, _data(), microbatches=4)


@pytest.mark.parametrize("resampler,per_row", [(False, 1), (True, 1), (False, 3)])
def test_labels_placeholders_and_feature_index_are_consistent(resampler, per_row):
    mc = _model(resampler=resampler)
    codec = TextCodec()
    it = SyntheticBatches(mc, _data(batch_size=4, seq_len=96, samples_per_row=per_row), codec=codec)
    batch = unstack_first(it.batch_at(0))
    check_placeholders(batch, mc)
    counts = feature_counts(mc)
    assert counts["vision"] == (5 if resampler else 16) and counts["audio"] == 6
    assistant = codec.token_id("<assistant>")
    for row in range(4):
        seg_ids = batch["segment_ids"][row]
        assert sorted(set(seg_ids) - {0}) == list(range(1, per_row + 1))
        spans_seen = set()
        for seg in range(1, per_row + 1):
            sample = it.sample(row * per_row + seg - 1)
            cols = np.nonzero(seg_ids == seg)[0]
            assert (np.diff(cols) == 1).all()  # one contiguous run per segment
            ids, labels = batch["input_ids"][row, cols], batch["labels"][row, cols]
            np.testing.assert_array_equal(batch["positions"][row, cols], np.arange(len(cols)))
            # The labelled tokens are exactly the caption words then <eos>, each predicted from the token before it.
            (t,) = np.nonzero(labels != IGNORE)
            assert codec.decode(labels[t]) == sample.answer + " <eos>"
            np.testing.assert_array_equal(labels[t], ids[t + 1])
            assert ids[t[0]] == assistant
            for name, data in sample.media:
                fidx = batch["feature_index"][name][row, cols]
                run = np.nonzero(fidx >= 0)[0]
                assert len(run) == counts[name]  # placeholder count == feature count
                assert (ids[run] == mc.placeholder_ids[name]).all() and (labels[run] == IGNORE).all()
                spans = set(batch["span_ids"][row, cols[run]])
                assert len(spans) == 1 and min(spans) > 0 and not spans & spans_seen
                spans_seen |= spans
                slot = fidx[run] // counts[name]
                np.testing.assert_array_equal(batch["encoder_inputs"][name][slot[0]], data)
                np.testing.assert_array_equal(fidx[run] % counts[name], np.arange(counts[name]))
            if not sample.media:
                assert (batch["span_ids"][row, cols] == 0).all()
        pad = seg_ids == 0
        assert (batch["labels"][row, pad] == IGNORE).all() and (batch["span_ids"][row, pad] == 0).all()


def test_image_caption_matches_the_pixels():
    """Oracle: the caption's colour and cell are recomputed from the rendered pixels."""
    rgb = {c: np.asarray(synthetic._RGB[c]) for c in COLOURS}
    for i in range(20):
        rng = synthetic.sample_rng(0, "train", i)
        s = synthetic.make_sample(rng, "image", image_size=36)
        img = (s.media[0][1] + 1) / 2
        words = s.answer.split()
        colour, shape, row, col = words[1], words[2], words[5], words[6]
        assert shape in SHAPES
        bright = img.max(-1) > 0.5
        ys, xs = np.nonzero(bright)
        assert ROWS[int(ys.mean() // 12)] == row and COLS[int(xs.mean() // 12)] == col
        mean_rgb = img[bright].mean(0)
        nearest = min(COLOURS, key=lambda c: np.abs(mean_rgb / mean_rgb.max() - rgb[c]).sum())
        assert nearest == colour


def test_tone_peaks_in_the_right_mel_band():
    """Oracle: the loudest mel band's centre frequency is the nearest band to the captioned tone."""
    fb = synthetic.mel_filterbank(16, 400, 16000, 4000.0)
    centres = (fb * np.linspace(0, 8000, 201)[:, None]).sum(0) / fb.sum(0)
    for i in range(10):
        s = synthetic.make_sample(synthetic.sample_rng(0, "train", i), "audio", n_frames=20, n_mels=16)
        hz = int(s.answer.split()[1])
        band = int(s.media[0][1].mean(0).argmax())
        assert band == int(np.argmin(np.abs(centres - hz)))


def test_errors_name_the_values():
    with pytest.raises(ValueError, match="no 'audio' encoder"):
        SyntheticBatches(_model(audio=False), _data())
    with pytest.raises(ValueError, match="placeholder_ids\\['vision'\\] is 9"):
        SyntheticBatches(_model().replace(placeholder_ids={"vision": 9, "audio": 4}), _data())
    with pytest.raises(ValueError, match="more than DataConfig.seq_len=20"):
        SyntheticBatches(_model(), _data(seq_len=20)).batch_at(0)
    with pytest.raises(ValueError, match="packing 4 samples needs more than DataConfig.seq_len=64"):
        SyntheticBatches(_model(), _data(samples_per_row=4, mixture={"image": 1.0})).batch_at(0)
    with pytest.raises(ValueError, match="vocab_size \\(10\\)"):
        SyntheticBatches(_model().replace(llm=LLMConfig(vocab_size=10)), _data())
    batch = unstack_first(SyntheticBatches(_model(), _data(mixture={"image": 1.0})).batch_at(0))
    batch["feature_index"]["vision"][2, 5] = -1
    with pytest.raises(ValueError, match="sample 2"):
        check_placeholders(batch, _model())


def test_tokenizer_round_trip_and_fixed_special_ids():
    codec = TextCodec()
    text = "<bos> <user> count from four : <assistant> five six seven <eos>"
    assert codec.decode(codec.encode(text)) == text
    assert codec.placeholder_ids() == {"vision": 3, "audio": 4} and codec.pad_id == 0
    with pytest.raises(ValueError, match="outside the synthetic vocabulary"):
        codec.encode("a purple circle")
    # The words before the motion words keep their ids (the vlm_tiny figures were measured with them); the motion
    # words and "video" come after them, and no motion word is also a place word.
    words = ("a", "red", "circle", "top", "left", "right", "image", "moving", "up", "down")
    assert [codec.token_id(w) for w in words] == [8, 24, 30, 33, 36, 38, 14, 69, 70, 71]
    assert [codec.token_id(w) for w in MOTIONS + ("video",)] == [72, 73, 74, 75, 76] and codec.vocab_size == 77
    assert not set(MOTIONS) & set(ROWS + COLS)


def _fill_ratio_shape(mask_HW):
    """Oracle for a rendered shape: its pixels over its bounding box (square 1, circle ~pi/4, triangle ~1/2)."""
    ys, xs = np.nonzero(mask_HW)
    fill = mask_HW.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    return "triangle" if fill < 0.675 else "circle" if fill < 0.97 else "square"


def test_native_recipe_batches_show_the_model_what_the_caption_says():
    """The LLM's view of configs/qwen2vl_tiny.gin's batches: each placeholder run's features point at packed patch
    rows; un-patchified (grid (t, h, w), HF patch order) and de-normalised, the instance's pixels must show what the
    run's training labels say: a video's shape moves NATIVE_VIDEO_STEP px along the caption's direction every frame
    (no frame repeated or dropped) and by a temporal patch's worth between temporal slices; an image's shape sits in
    the caption's cell; the shape word is the one its fill ratio gives (the shapes stay apart after patching); each
    token's M-RoPE position is its merged unit's (t, h / m, w / m) from the run's first position."""
    from mllm_jax.data.processor.image import CLIP_MEAN, CLIP_STD
    from mllm_jax.train import loop

    cfg = loop.load_run_config(["configs/qwen2vl_tiny.gin"], ["DataConfig.batch_size = 8"])
    enc_cfg = cfg.model.encoders["vision"]
    p, tp, m = enc_cfg.patch_size, enc_cfg.temporal_patch_size, enc_cfg.spatial_merge_size
    stream = SyntheticBatches(cfg.model, cfg.data)
    codec = stream.builder.codec
    b = unstack_first(stream.batch_at(cfg.data.mixture_warmup_steps))  # the first step of images and videos
    enc = b["encoder_inputs"]["vision"]
    rows, per_row = enc["segment_ids"].shape
    patches = enc["patches"].reshape(rows * per_row, 3, tp, p, p)
    grid = enc["grid"].reshape(rows * per_row, 3)
    seen = {"video": 0, "image": 0}
    for row in range(b["input_ids"].shape[0]):
        for span in np.unique(b["span_ids"][row][b["span_ids"][row] > 0]):
            toks = np.flatnonzero(b["span_ids"][row] == span)
            feats = b["feature_index"]["vision"][row, toks]
            idx = (feats[:, None] * m * m + np.arange(m * m)).reshape(-1)  # the merged unit's patches
            g = grid[idx]
            t, gh, gw = g.max(0) + 1
            assert len(idx) == t * gh * gw  # the run covers one whole instance
            frames = np.zeros((t * tp, gh * p, gw * p, 3), np.float32)
            for (gt, gy, gx), x in zip(g, patches[idx]):
                frames[gt * tp:(gt + 1) * tp, gy * p:(gy + 1) * p, gx * p:(gx + 1) * p] = x.transpose(1, 2, 3, 0)
            frames = frames * np.asarray(CLIP_STD) + np.asarray(CLIP_MEAN)
            mask = frames.max(-1) - frames.min(-1) > 0.4  # the saturated shape (the grey frame and background not)
            rope = b["rope_positions"][row, toks]
            np.testing.assert_array_equal(rope - rope[0], np.stack([g[::m * m, 0], g[::m * m, 1] // m,
                                                                    g[::m * m, 2] // m], -1))
            words, j = [], toks[-1]
            while b["labels"][row, j] != codec.token_id("<eos>"):
                if b["labels"][row, j] != IGNORE:
                    words.append(codec.decode([int(b["labels"][row, j])]).strip())
                j += 1
            assert _fill_ratio_shape(mask[0]) == words[2], words
            # The prompt after the placeholder run names the medium: a clip is asked about as a video.
            prompt = codec.decode(b["input_ids"][row, toks[-1] + 1:toks[-1] + 5])
            assert prompt == f"describe the {'video' if words[3] == 'moving' else 'image'} .", (prompt, words)
            cents = np.array([np.argwhere(f).mean(0) for f in mask])  # (y, x) per frame
            if words[3] == "moving":
                seen["video"] += 1
                direction = np.asarray(synthetic.VIDEO_MOTIONS[words[4]])
                step = np.diff(cents, axis=0)
                np.testing.assert_allclose(step @ direction, synthetic.NATIVE_VIDEO_STEP, atol=0.25, err_msg=words)
                np.testing.assert_allclose(step @ direction[::-1], 0, atol=0.25, err_msg=words)
                slices = cents.reshape(t, tp, 2).mean(1)
                np.testing.assert_allclose(np.diff(slices, axis=0) @ direction, tp * synthetic.NATIVE_VIDEO_STEP,
                                           atol=0.25)
            else:
                seen["image"] += 1
                assert t == 1 and (ROWS[int(cents[0, 0] * 3 // (gh * p))], COLS[int(cents[0, 1] * 3 // (gw * p))]) \
                    == (words[5], words[6]), words
    assert seen["video"] >= 8 and seen["image"] >= 8, seen


def test_held_out_eval_scores_motion_words_apart_from_column_words():
    """loop.evaluate's word groups on the native recipe's held-out batch, predictions = labels except the motion word
    of the videos in even rows: eval_accuracy_motion is the share of videos whose motion was kept (counted from the
    samples' own captions), and the image position words stay at 1."""
    from mllm_jax.train import loop

    cfg = loop.load_run_config(["configs/qwen2vl_tiny.gin"], ["DataConfig.batch_size = 8"])
    stream = SyntheticBatches(cfg.model, cfg.data, split="eval")
    codec = stream.builder.codec
    batch = unstack_first(stream.batch_at(0))
    labels, k = batch["labels"], cfg.data.samples_per_row
    after_moving = batch["input_ids"] == codec.token_id("moving")
    pred = labels.copy()
    broken = after_moving & (np.arange(len(labels)) % 2 == 0)[:, None]
    up, down = codec.token_id("upward"), codec.token_id("downward")
    pred[broken] = np.where(labels[broken] == up, down, up)
    out = loop.evaluate(lambda state, b: (1.0, 1.0, pred), None, [batch], lambda b: b,
                        loop.caption_word_groups(codec))
    videos = [i // k for i in range(len(labels) * k) if stream.sample(i).answer.split()[3] == "moving"]
    assert len(videos) >= 4 and 0 < sum(r % 2 == 0 for r in videos) < len(videos)
    assert out["eval_accuracy_motion"] == pytest.approx(sum(r % 2 for r in videos) / len(videos))
    assert out["eval_accuracy_position"] == 1.0 and out["eval_accuracy_colour"] == 1.0
    assert out["eval_accuracy_image_words"] < 1.0


def test_slot_scores_count_each_caption_word_at_its_place():
    from mllm_jax.train.captions import slot_scores

    answers = ["a red circle at the top left", "a blue square at the bottom right", "a red circle moving leftward",
               "a green triangle moving upward", "count from four :"]
    got = ["a red square at the top right", "a blue square at the bottom right", "a red circle moving rightward",
           "a green circle", "five six seven"]
    assert slot_scores(got, answers) == {
        "image_colour": 1.0, "image_shape": 0.5, "image_row": 1.0, "image_column": 0.5,
        "video_colour": 1.0, "video_shape": 0.5, "video_motion": 0.0}
    with pytest.raises(ValueError, match="2 captions for 1 answers"):
        slot_scores(["a", "b"], ["a"])
