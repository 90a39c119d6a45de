"""Qwen2-VL / Qwen2.5-VL (Qwen2VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration) against PyTorch
transformers: the config map, logits on packed native-resolution batches (images of different sizes and a video),
two samples packed into one row, the grid / placeholder-count refusal, and export.

One tiny random transformers model per family (CPU, float32), saved once by transformers itself (the hub's names:
visual.*, model.*). Oracles: its forward pass on each sample alone (HF's pixel_values /
pixel_values_videos, grids, mm_token_type_ids, so transformers computes its own M-RoPE positions), and transformers
reloading what we write. Our batches hold HF's tokenizer's ids (<video_pad> runs for videos: the imported config's
placeholder alias) and, for Qwen2.5-VL, each instance's patches window-major (native_pack.window_order).
"""

import dataclasses

import numpy as np
import pytest
from flax import nnx

from mllm_jax import check_batch
from mllm_jax.batch import IGNORE
from mllm_jax.data import native_pack
from mllm_jax.data.processor.native_vision import patch_grid
from mllm_jax.hf import config_map as cm
from mllm_jax.hf import load_pretrained, save_pretrained
from mllm_jax.native_vision import window_units
from model_testlib import make_every_tensor_count

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB, START, END, IMAGE, VIDEO = 96, 88, 89, 90, 91  # inside the tiny vocabulary (real: 151652, 151653, 151655/6)
M = 2  # spatial merge
D = 32  # LLM width
P = 64  # patches per packed row
TOKENS_PER_SECOND, SECONDS_PER_GRID = 4, 1.0  # Qwen2.5-VL video: temporal positions step by 4 per grid step

# Each sample: text runs (lengths) and instances ("image" | "video", (t, h, w) patch grid), in order.
SAMPLES = [
    [5, ("image", (1, 4, 6)), 3, ("video", (2, 4, 4)), 4],  # 6 image tokens, 8 video tokens over two time steps
    [2, ("image", (1, 6, 4)), 2, ("image", (1, 4, 4)), 3],  # two images of other sizes
]


def _hf_config(family):
    text = dict(vocab_size=VOCAB, hidden_size=D, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=48, max_position_embeddings=128, bos_token_id=1, eos_token_id=2,
                rope_parameters=dict(rope_type="default", mrope_section=[1, 1, 2], rope_theta=1000.0))
    vision = dict(depth=2, num_heads=4, in_channels=3, patch_size=4, spatial_merge_size=M, temporal_patch_size=2)
    tokens = dict(image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=START, vision_end_token_id=END)
    if family == "qwen2_vl":
        vision |= dict(embed_dim=32, hidden_size=D, mlp_ratio=2, hidden_act="quick_gelu")
        return transformers.Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **tokens)
    # window 16 px = 2 merged units: the 4 x 6 image has partial windows; vision layer 1 attends the whole slice
    vision |= dict(hidden_size=32, intermediate_size=40, out_hidden_size=D, window_size=16, fullatt_block_indexes=[1],
                   hidden_act="silu", tokens_per_second=TOKENS_PER_SECOND)
    return transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **tokens)


def _hf_model(family):
    cls = {"qwen2_vl": transformers.Qwen2VLForConditionalGeneration,
           "qwen2_5_vl": transformers.Qwen2_5_VLForConditionalGeneration}[family]
    config = _hf_config(family)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = cls(config).eval()
    make_every_tensor_count(model)
    return model


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def case(request, tmp_path_factory):
    """(family, the transformers model, the directory transformers saved it to, our model loaded from it)."""
    family = request.param
    model = _hf_model(family)
    path = str(tmp_path_factory.mktemp(family) / "hf")
    model.save_pretrained(path)
    return family, model, path, load_pretrained(path)


@pytest.fixture(scope="module")
def parity(case):
    """(the samples, transformers' logits on each alone, our batch: row 0 / row 1 each sample alone with text
    padding after it, rows 2 and 3 both packed, in either order (segments 1 and 2); every instance of the batch
    shares the patch rows)."""
    _, hf, _, ours = case
    samples = _samples(ours.config.encoders["vision"])
    refs = [_hf_logits(hf, s) for s in samples]
    n0, n1 = (len(s[0]) for s in samples)
    return samples, refs, _our_batch(ours.config, ROWS(samples), seq_len=n0 + n1 + 3)


def ROWS(samples):
    return [[samples[0]], [samples[1]], samples, samples[::-1]]


# --------------------------------------------------------------------------------------------------- samples


def _sample(parts, rng, patch_dim):
    """One sample as HF's processor lays it out (<start> pad*n <end> per instance) -> (HF ids with video_token_id,
    mm_token_type_ids, instances [(kind, grid, patches)], (start, grid) per instance in token order)."""
    ids, types, instances, spans = [], [], [], []
    for part in parts:
        if isinstance(part, int):
            ids += list(rng.integers(3, START, part))
            types += [0] * part
            continue
        kind, (t, h, w) = part
        n = t * h * w // (M * M)
        ids.append(START)
        types.append(0)
        spans.append((len(ids), (t, h, w), kind))
        ids += [IMAGE if kind == "image" else VIDEO] * n
        types += [1 if kind == "image" else 2] * n
        ids.append(END)
        types.append(0)
        instances.append((kind, (t, h, w), rng.standard_normal((t * h * w, patch_dim)).astype(np.float32)))
    return np.array(ids), np.array(types), instances, spans


def _samples(enc):
    rng = np.random.default_rng(0)
    return [_sample(parts, rng, enc.patch_dim) for parts in SAMPLES]


def _hf_inputs(model, sample) -> dict:
    """transformers' inputs for one sample: ids, mm_token_type_ids (so it computes its M-RoPE positions), pixels and
    grids of its images and of its videos (each in order), and Qwen2.5-VL's seconds per video grid step."""
    ids, types, instances, _ = sample
    kw = {"input_ids": torch.tensor(ids[None]), "mm_token_type_ids": torch.tensor(types[None])}
    for kind, key in (("image", "pixel_values"), ("video", "pixel_values_videos")):
        mine = [(g, x) for k, g, x in instances if k == kind]
        if mine:
            kw[key] = torch.from_numpy(np.concatenate([x for _, x in mine]))
            kw[f"{kind}_grid_thw"] = torch.tensor([g for g, _ in mine])
    if "pixel_values_videos" in kw and isinstance(model, transformers.Qwen2_5_VLForConditionalGeneration):
        kw["second_per_grid_ts"] = torch.tensor([SECONDS_PER_GRID] * len(kw["video_grid_thw"]))
    return kw


def _hf_logits(model, sample):
    with torch.no_grad():
        return model(**_hf_inputs(model, sample)).logits[0].numpy()


def _our_batch(cfg, rows, seq_len, video_interval=None):
    """Our packed batch: ``rows`` lists the samples of each row (packed one after another, own segment, positions
    and M-RoPE positions restarting); every instance of the batch packed into patch rows of P patches. The ids are
    HF's tokenizer's: a video's run is <video_pad> (video_token_id, the imported config's placeholder alias), an
    image's <image_pad>. ``video_interval``: a wrong M-RoPE time step for videos (the oracle's check)."""
    enc = cfg.encoders["vision"]
    # HF's M-RoPE time step of a video: tokens_per_second * second_per_grid_t (Qwen2.5-VL), else 1
    video = enc.tokens_per_second * SECONDS_PER_GRID if enc.tokens_per_second else 1
    patches, coords, runs = [], [], []  # runs: (row, first token, tokens) per instance, in pack order
    batch = {k: np.zeros((len(rows), seq_len), np.int32) for k in ("input_ids", "positions", "segment_ids",
                                                                       "span_ids")}
    batch["rope_positions"] = np.zeros((len(rows), seq_len, 3), np.int32)
    for r, samples in enumerate(rows):
        at, span = 0, 0
        for seg, (ids, _, instances, spans) in enumerate(samples, start=1):
            n = len(ids)
            batch["input_ids"][r, at:at + n] = ids
            batch["positions"][r, at:at + n] = np.arange(n)
            batch["segment_ids"][r, at:at + n] = seg
            rope_spans = [(s, g, video_interval or video if kind == "video" else 1) for s, g, kind in spans]
            batch["rope_positions"][r, at:at + n] = native_pack.rope_positions(n, rope_spans, M)
            for (start, grid, _), (_, _, x) in zip(spans, instances):
                tokens = int(np.prod(grid)) // (M * M)
                span += 1
                batch["span_ids"][r, at + start:at + start + tokens] = span
                patches.append(x)
                coords.append(patch_grid(grid, M))
                runs.append((r, at + start, tokens))
            at += n
    plan = native_pack.plan_rows([len(x) for x in patches], P, M * M, native_pack.row_buckets(len(patches)))
    # Qwen2.5-VL: each instance window-major, feature_index reading its merged units back in token order
    packed = native_pack.pack(patches, coords, plan, M * M, window=window_units(enc))
    fi = np.full((len(rows), seq_len), -1, np.int32)
    for (r, start, tokens), index in zip(runs, packed.feature_index):
        fi[r, start:start + tokens] = index
    batch["labels"] = np.full((len(rows), seq_len), IGNORE, np.int32)
    return {**batch, "encoder_inputs": {"vision": packed.inputs}, "feature_index": {"vision": fi}}


_logits = nnx.jit(lambda model, batch: model.llm.logits(model(batch)))


def _our_logits(model, batch):
    return np.asarray(_logits(model, batch))


# ------------------------------------------------------------------------------------------------------ config


def test_config_maps_and_round_trips(case):
    family, hf, _, ours = case
    cfg = ours.config
    enc, proj = cfg.encoders["vision"], cfg.projectors["vision"]
    assert enc.kind == family and proj.kind == "patch_merger" and cfg.media_attention == "causal"
    assert cfg.placeholder_ids == {"vision": IMAGE} and (proj.boi_token_id, proj.eoi_token_id) == (START, END)
    assert cfg.placeholder_aliases == {VIDEO: "vision"} and cfg.placeholder_tokens("vision") == (IMAGE, VIDEO)
    assert cfg.llm.mrope_section == (1, 1, 2) and cfg.llm.qkv_bias
    assert cfg.llm.tie_embeddings == (family == "qwen2_5_vl")
    assert enc.tokens_per_second == (TOKENS_PER_SECOND if family == "qwen2_5_vl" else 0)
    exported = cm.qwen2vl_to_hf(cfg)
    assert _canon(cm.config_from_hf(exported)) == _canon(cfg)
    # transformers reads the export as the config it came from
    back = type(hf.config)(**exported).to_dict()
    for key in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id",
                "tie_word_embeddings"):
        assert back[key] == hf.config.to_dict()[key], key
    assert _canon(cm.config_from_hf(back)) == _canon(cfg)


def _canon(cfg):
    """The export writes head_dim explicitly; the tiny HF config leaves it to hidden_size / heads."""
    return cfg.replace(llm=dataclasses.replace(cfg.llm, head_dim=cfg.llm.resolved_head_dim))


# Qwen/Qwen2-VL-7B-Instruct's config.json (transformers 4): the text fields flat at the top level, the vision
# config's old model_type, rope_scaling {"type": "mrope"}.
HUB_7B = {"architectures": ["Qwen2VLForConditionalGeneration"], "attention_dropout": 0.0, "bos_token_id": 151643,
          "eos_token_id": 151645, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
          "vision_token_id": 151654, "image_token_id": 151655, "video_token_id": 151656, "hidden_act": "silu",
          "hidden_size": 3584, "initializer_range": 0.02, "intermediate_size": 18944, "max_position_embeddings": 32768,
          "max_window_layers": 28, "model_type": "qwen2_vl", "num_attention_heads": 28, "num_hidden_layers": 28,
          "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768,
          "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.41.2",
          "use_cache": True, "use_sliding_window": False,
          "vision_config": {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_chans": 3,
                            "hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14,
                            "temporal_patch_size": 2},
          "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "vocab_size": 152064}


# Qwen/Qwen2.5-VL-7B-Instruct's: the same flat layout, the window-attention tower.
HUB_25_7B = {**{k: v for k, v in HUB_7B.items() if k != "vision_config"}, "model_type": "qwen2_5_vl",
             "architectures": ["Qwen2_5_VLForConditionalGeneration"], "max_position_embeddings": 128000,
             "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
                               "num_heads": 16, "in_chans": 3, "out_hidden_size": 3584, "patch_size": 14,
                               "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
                               "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2,
                               "temporal_patch_size": 2}}


@pytest.mark.parametrize("hub", [HUB_7B, HUB_25_7B], ids=["qwen2_vl", "qwen2_5_vl"])
def test_hub_flat_config_reads_as_transformers_reads_it(hub):
    """The hub's flat config.json and transformers' own parse of it (nested text_config) give one ModelConfig."""
    cls = transformers.Qwen2VLConfig if hub["model_type"] == "qwen2_vl" else transformers.Qwen2_5_VLConfig
    ours = cm.config_from_hf(hub)
    assert ours == cm.config_from_hf(cls(**hub).to_dict())
    llm, enc = ours.llm, ours.encoders["vision"]
    assert (llm.d_model, llm.n_layers, llm.n_kv_heads, llm.rope_theta, llm.mrope_section, llm.tie_embeddings) == (
        3584, 28, 4, 1e6, (16, 24, 24), False)
    assert (enc.kind, enc.d_model, enc.n_layers, enc.patch_size) == (hub["model_type"], 1280, 32, 14)
    if hub is HUB_25_7B:
        assert (enc.d_ff, enc.window_size, enc.full_attention_layers, enc.tokens_per_second) == (
            3420, 112, (7, 15, 23, 31), 2)
    else:
        assert enc.d_ff == 5120 and enc.window_size == 0
    assert ours.placeholder_ids == {"vision": 151655} and ours.placeholder_aliases == {151656: "vision"}


def test_config_refusals():
    with pytest.raises(ValueError, match="video_token_id=151655 equals image_token_id"):
        cm.config_from_hf({**HUB_7B, "video_token_id": 151655})
    other = cm.config_from_hf({**HUB_7B, "video_token_id": 7})  # any other video id is the alias, written back
    assert other.placeholder_aliases == {7: "vision"} and cm.qwen2vl_to_hf(other)["video_token_id"] == 7
    from mllm_jax.multimodal import validate_config
    for bad in ({7: "audio"}, {151655: "vision"}):  # no such modality; an id that is a placeholder itself
        with pytest.raises(ValueError, match=r"placeholder_aliases .* must name modalities of placeholder_ids"):
            validate_config(other.replace(placeholder_aliases=bad))
    with pytest.raises(ValueError, match=r"output width \(64\)"):
        cm.config_from_hf({**HUB_7B, "vision_config": {**HUB_7B["vision_config"], "hidden_size": 64}})
    cfg = cm.config_from_hf(HUB_7B)
    with pytest.raises(ValueError, match="media_attention='bidirectional'"):
        cm.qwen2vl_to_hf(cfg.replace(media_attention="bidirectional"))
    with pytest.raises(ValueError, match="mrope_section"):
        cm.qwen2vl_to_hf(cfg.replace(llm=dataclasses.replace(cfg.llm, mrope_section=None)))


def _checkpoint(tmp_path, name, tensors, config_from):
    import shutil

    from mllm_jax.hf.safetensors_io import write_checkpoint

    out = tmp_path / name
    write_checkpoint(str(out), tensors)
    shutil.copy(f"{config_from}/config.json", out / "config.json")
    return str(out)


def _params(module) -> dict:
    return {k: np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}


def test_transformers_5_module_names_load_and_stray_tensors_are_refused(case, tmp_path):
    """transformers saves the hub's names (visual.*, model.*); its modules are named model.visual.*,
    model.language_model.* (what its state_dict holds): a checkpoint in those names loads to the same weights. A
    vision block beyond the config's depth is a ValueError naming the tensor, not a silent partial load."""
    from mllm_jax.hf.safetensors_io import CheckpointReader

    _, hf, path, ours = case
    keys = set(CheckpointReader(path).keys())
    assert "visual.blocks.0.attn.qkv.weight" in keys and "model.embed_tokens.weight" in keys  # the hub's names
    state = {k: v.numpy() for k, v in hf.state_dict().items()}  # lm_head.weight too (the embedding, when tied)
    assert "model.language_model.embed_tokens.weight" in state and "model.visual.blocks.0.norm1.weight" in state
    again = load_pretrained(_checkpoint(tmp_path, "t5", state, path))
    want = _params(ours)
    for k, v in _params(again).items():
        np.testing.assert_array_equal(v, want[k], err_msg=str(k))
    stray = "model.visual.blocks.2.norm1.weight"
    state[stray] = state["model.visual.blocks.1.norm1.weight"]
    with pytest.raises(ValueError, match=stray.replace(".", r"\.")):
        load_pretrained(_checkpoint(tmp_path, "stray", state, path))


# ------------------------------------------------------------------------------------------------------ logits


def test_logits_match_transformers_packed_and_alone(case, parity):
    """Each sample's logits, alone in its row and packed with the other (before or after it), equal transformers' on
    it alone."""
    family, _, _, ours = case
    samples, refs, batch = parity
    n0, n1 = (len(s[0]) for s in samples)
    check_batch(batch, ours.config)
    assert batch["encoder_inputs"]["vision"]["segment_ids"].max() >= 2  # instances really share patch rows
    # The prompts hold HF's <video_pad> runs: placeholders through the imported config's alias, refused without it
    assert (batch["input_ids"] == VIDEO).sum() == 3 * 8 and batch["feature_index"]["vision"][
        batch["input_ids"] == VIDEO].min() >= 0  # sample 0's 2 x 2 x 2-unit video in rows 0, 2 and 3
    with pytest.raises(ValueError, match=r"sample 0: 6 'vision' placeholder tokens but 14 'vision' features"):
        check_batch(batch, ours.config.replace(placeholder_aliases={}))
    got = _our_logits(ours, batch)
    np.testing.assert_allclose(got[0, :n0], refs[0], atol=1e-4, rtol=1e-4, err_msg="sample 0 alone")
    np.testing.assert_allclose(got[1, :n1], refs[1], atol=1e-4, rtol=1e-4, err_msg="sample 1 alone")
    np.testing.assert_allclose(got[2, :n0], refs[0], atol=1e-4, rtol=1e-4, err_msg="sample 0 packed")
    np.testing.assert_allclose(got[2, n0:n0 + n1], refs[1], atol=1e-4, rtol=1e-4, err_msg="sample 1 packed")
    np.testing.assert_allclose(got[3, :n1], refs[1], atol=1e-4, rtol=1e-4, err_msg="sample 1 packed first")
    np.testing.assert_allclose(got[3, n1:n0 + n1], refs[0], atol=1e-4, rtol=1e-4, err_msg="sample 0 packed second")
    # The oracle can fail: the images' grids transposed (2-D RoPE of the tower) change the logits...
    vision = batch["encoder_inputs"]["vision"]
    bad = dict(batch, encoder_inputs={"vision": dict(vision, grid=vision["grid"][..., [0, 2, 1]])})
    assert np.abs(_our_logits(ours, bad)[0, :n0] - refs[0]).max() > 1e-2
    if family == "qwen2_5_vl":  # ... and so does the video's M-RoPE time step taken as Qwen2-VL's (1, not 4)
        bad = _our_batch(ours.config, ROWS(samples), seq_len=n0 + n1 + 3, video_interval=1)
        assert np.abs(_our_logits(ours, bad)[0, :n0] - refs[0]).max() > 1e-2
        # ... and so does each run reading its window-major merged units in packed order (not its tokens' own)
        fi, span = batch["feature_index"]["vision"], batch["span_ids"]
        raster = fi.copy()
        for r in range(len(fi)):
            for sp in np.unique(span[r][fi[r] >= 0]):
                run = np.flatnonzero((span[r] == sp) & (fi[r] >= 0))
                raster[r, run] = fi[r, run].min() + np.arange(len(run))
        assert not np.array_equal(raster, fi)
        bad = dict(batch, feature_index={"vision": raster})
        assert np.abs(_our_logits(ours, bad)[0, :n0] - refs[0]).max() > 1e-2


def test_grid_that_does_not_match_its_placeholder_run_is_refused(case):
    """A run one token short of its instance's merged grid: check_batch names the grid and both counts (and
    transformers refuses the same sample)."""
    _, hf, _, ours = case
    ids, types, instances, spans = _samples(ours.config.encoders["vision"])[0]
    start = spans[0][0]
    short = (np.delete(ids, start), np.delete(types, start), instances, [spans[0]])
    short_spans = [spans[0]] + [(s - 1, g, k) for s, g, k in spans[1:]]
    batch = _our_batch(ours.config, [[(short[0], short[1], instances, short_spans)]], seq_len=len(ids))
    with pytest.raises(ValueError, match=r"has 5 tokens but its instance .* grid \(t, h, w\) = \(1, 4, 6\), i.e. 6"):
        check_batch(batch, ours.config)
    with pytest.raises(ValueError, match="Image features and image tokens do not match"):
        _hf_logits(hf, short)


# ------------------------------------------------------------------------------------------------------ export


def test_saved_model_loads_in_transformers_with_the_same_logits(case, parity, tmp_path):
    """save_pretrained writes the hub's layout (visual.*, model.*, lm_head.weight); transformers loads it with no
    missing or unexpected tensor and gives the original model's logits; we load it back to the same model."""
    family, hf, _, ours = case
    samples, refs, batch = parity
    path = str(tmp_path / "ours")
    save_pretrained(ours, path)
    again, info = type(hf).from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    for sample, ref in zip(samples, refs):
        np.testing.assert_allclose(_hf_logits(again.eval(), sample), ref, atol=1e-5, rtol=1e-5)
    ours_again = load_pretrained(path)
    assert _canon(ours_again.config) == _canon(ours.config)
    np.testing.assert_allclose(_our_logits(ours_again, batch), _our_logits(ours, batch), atol=1e-6)


def test_pretrained_recipe_keeps_the_recipes_packing_settings(case):
    """PretrainedConfig.model = a Qwen2-VL directory: the architecture and every weight come from the checkpoint
    (the weights equal load_pretrained's, whose logits are transformers'), the packing and processor settings
    (patches_per_row, min/max_pixels, fps) from the recipe: config.json does not hold them."""
    import jax

    from mllm_jax.config import LLMConfig, ModelConfig, NativeVisionConfig, ProjectorConfig
    from mllm_jax.hf.recipe import PretrainedConfig, create_pretrained_model
    from mllm_jax.parallel.config import ParallelConfig
    from mllm_jax.parallel.mesh import make_mesh

    _, _, path, ours = case
    run = dict(patches_per_row=P, min_pixels=8 * 8, max_pixels=40 * 40, fps=1.0)
    recipe = ModelConfig(llm=LLMConfig(), encoders={"vision": NativeVisionConfig(**run)},
                         projectors={"vision": ProjectorConfig(kind="patch_merger")}, placeholder_ids={"vision": 3},
                         media_attention="causal", trainable={"encoders/vision": False})
    pc = ParallelConfig()
    model, cfg = create_pretrained_model(recipe, make_mesh(pc, devices=jax.devices()[:1]), pc,
                                         PretrainedConfig(model=path))
    enc = cfg.encoders["vision"]
    assert {k: getattr(enc, k) for k in run} == run and cfg.trainable == {"encoders/vision": False}
    assert dataclasses.replace(enc, **{k: getattr(ours.config.encoders["vision"], k) for k in run}) == \
        ours.config.encoders["vision"]
    assert cfg.llm == ours.config.llm and cfg.placeholder_ids == {"vision": IMAGE}
    got = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    want = dict(nnx.to_flat_state(nnx.state(ours, nnx.Param)))
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(np.asarray(got[k].get_value()), np.asarray(want[k].get_value()), err_msg=str(k))


def test_sharded_forward_equals_one_device(case, parity):
    """The imported model on fsdp=2 x tensor=2 (weights placed as build.create_model lays them out; the batch placed
    as training places it: token rows and packed patch rows split over fsdp) gives the one-device logits."""
    import jax

    from mllm_jax.build import abstract_model
    from mllm_jax.data.placement import put_batch
    from mllm_jax.parallel.config import ParallelConfig
    from mllm_jax.parallel.mesh import make_mesh
    from mllm_jax.parallel.sharding import rule_table
    from model_testlib import place

    _, _, _, ours = case
    host = parity[2]
    pc = ParallelConfig(fsdp=2, tensor=2)
    mesh = make_mesh(pc, devices=jax.devices()[:4])
    gdef, state = place(ours, abstract_model(ours.config, mesh, pc), mesh)
    assert not state["encoders"]["vision"]["layers"]["attn"]["qkv"]["kernel"].get_value().sharding.is_fully_replicated
    batch = put_batch(host, mesh, leading=0, rule_table=rule_table(ours.config, pc))
    for a in (batch["input_ids"], batch["encoder_inputs"]["vision"]["patches"]):
        assert a.sharding.shard_shape(a.shape)[0] == a.shape[0] // 2  # rows really split in two
    with jax.set_mesh(mesh):
        sharded = jax.jit(lambda s, b: (lambda m: m.llm.logits(m(b)))(nnx.merge(gdef, s)))(state, batch)
    np.testing.assert_allclose(np.asarray(sharded), _our_logits(ours, host), atol=1e-5, rtol=1e-5)


def test_greedy_generation_matches_transformers(case):
    """decode.generate on the two samples (one right-padded prompt per row, their instances packed together) gives
    transformers' greedy generate on each alone: the same tokens and the same logits at every step (the M-RoPE
    positions of generated text continue from the prompt's largest position + 1, HF's rope_deltas)."""
    from mllm_jax.decode import SamplingConfig, generate

    _, hf, _, ours = case
    samples = _samples(ours.config.encoders["vision"])
    n = max(len(s[0]) for s in samples)
    batch = _our_batch(ours.config, [[s] for s in samples], seq_len=n)
    del batch["labels"]
    new = 4
    out = generate(ours, batch, max_new_tokens=new, sampling=SamplingConfig(temperature=0.0), return_logits=True)
    for i, sample in enumerate(samples):
        with torch.no_grad():
            ref = hf.generate(**_hf_inputs(hf, sample), max_new_tokens=new, do_sample=False, output_logits=True,
                              return_dict_in_generate=True, eos_token_id=None, pad_token_id=0)
        np.testing.assert_array_equal(out.tokens[i][:new], ref.sequences[0, len(sample[0]):].numpy())
        np.testing.assert_allclose(out.logits[i][:new], np.stack([l[0].numpy() for l in ref.logits]), atol=1e-4,
                                   rtol=1e-4)
