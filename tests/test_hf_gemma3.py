"""Gemma 3 multimodal (Gemma3ForConditionalGeneration) against PyTorch transformers: the pooling projector alone, the
config map, logits on a batch with several images (each image's tokens one bidirectional span), logits on what our
processor makes of chat messages (pan-and-scan crops) against Gemma3Processor's inputs, and export.

One tiny random transformers model per module (CPU, float32), saved once; oracles: its forward passes, its own mask
functions, and transformers reloading what we write.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mllm_jax import kernels
from mllm_jax.config import ProjectorConfig
from mllm_jax.hf import config_map as cm
from mllm_jax.hf import load_pretrained, save_pretrained
from mllm_jax.projector import Projector

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

IMAGE, BOI, EOI = 60, 61, 62  # ids inside the tiny vocabulary (the real ones are 262144, 255999, 256000)
TOKENS_PER_IMAGE = 4  # a 4x4 patch grid (16 px / 4 px) pooled 2x2 -> 2x2
WINDOW = 6  # the local layers' window: shorter than the sequence, so it binds, and >= TOKENS_PER_IMAGE


def _hf_config():
    text = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                head_dim=8, intermediate_size=48, max_position_embeddings=64, sliding_window=WINDOW,
                query_pre_attn_scalar=8, layer_types=["sliding_attention", "full_attention"],
                rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                                 "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000.0}})
    vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4, image_size=16,
                  patch_size=4, vision_use_head=False)
    return transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=TOKENS_PER_IMAGE,
                                     image_token_index=IMAGE, boi_token_index=BOI, eoi_token_index=EOI)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """(the transformers model with random weights, the directory it saved)."""
    torch.manual_seed(0)
    model = transformers.Gemma3ForConditionalGeneration(_hf_config())
    with torch.no_grad():  # large enough that every term matters (norm weights 0 and biases 0 otherwise)
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    path = str(tmp_path_factory.mktemp("gemma3") / "hf")
    model.eval().save_pretrained(path)
    return model, path


@pytest.fixture(scope="module")
def ours(hf_dir):
    return load_pretrained(hf_dir[1])


def _inputs():
    """Two rows of 20 tokens laid out as HF's processor lays an image out (boi, TOKENS_PER_IMAGE image tokens, eoi):
    row 0 holds two images, row 1 one. Returns (ids [2, 20], token_type_ids, pixels NHWC [3, 16, 16, 3], our batch,
    whose image axis has a fourth, unused zero row (the contract's static instance count) so that it divides over the
    4 devices of the sharded test)."""
    rng = np.random.default_rng(0)
    ids = rng.integers(3, IMAGE, (2, 20))
    image = [BOI] + [IMAGE] * TOKENS_PER_IMAGE + [EOI]
    ids[0, 2:8] = ids[0, 11:17] = ids[1, 7:13] = image
    pixels = rng.standard_normal((3, 16, 16, 3)).astype(np.float32)
    is_image = ids == IMAGE
    fi = np.full(ids.shape, -1, np.int32)
    fi[is_image] = np.arange(is_image.sum())  # row-major: HF's masked_scatter order, images in pixel order
    span = np.zeros(ids.shape, np.int32)
    span[is_image] = 1 + np.arange(is_image.sum()) // TOKENS_PER_IMAGE  # one span per image
    batch = {"input_ids": jnp.asarray(ids, jnp.int32),
             "positions": jnp.asarray(np.tile(np.arange(20), (2, 1)), jnp.int32),
             "segment_ids": jnp.ones(ids.shape, jnp.int32), "span_ids": jnp.asarray(span),
             "encoder_inputs": {"vision": jnp.asarray(np.concatenate([pixels, np.zeros_like(pixels[:1])]))},
             "feature_index": {"vision": jnp.asarray(fi)}}
    return ids, is_image.astype(np.int64), pixels, batch


def _hf_logits(model, ids, token_type_ids, pixels):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids),
                     token_type_ids=None if token_type_ids is None else torch.tensor(token_type_ids),
                     pixel_values=torch.tensor(pixels.transpose(0, 3, 1, 2))).logits.numpy()


_logits = nnx.jit(lambda model, batch: model.llm.logits(model(batch)))  # one compile per module for every call


def _our_logits(model, batch):
    return np.asarray(_logits(model, batch))


# --------------------------------------------------------------------------------------------------- projector


def test_projector_matches_transformers_module(hf_dir):
    """Pooling, (1 + w) norm and projection against Gemma3MultiModalProjector alone, to 1e-5."""
    hf = hf_dir[0].model.multi_modal_projector
    cfg = ProjectorConfig(kind="gemma3", tokens_per_image=TOKENS_PER_IMAGE, norm_eps=1e-6)
    proj = Projector(cfg, 32, 32, rngs=nnx.Rngs(0))
    proj.norm.scale[...] = jnp.asarray(hf.mm_soft_emb_norm.weight.detach().numpy())
    proj.proj.kernel[...] = jnp.asarray(hf.mm_input_projection_weight.detach().numpy())  # [in, out] both sides
    x = np.random.default_rng(1).standard_normal((3, 16, 32)).astype(np.float32)
    with torch.no_grad():
        ref = hf(torch.tensor(x)).numpy()
    out = np.asarray(proj(jnp.asarray(x)))
    assert out.shape == (3, TOKENS_PER_IMAGE, 32)
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)


def test_projector_token_count_and_refusals():
    cfg = ProjectorConfig(kind="gemma3", tokens_per_image=4)
    assert cfg.output_tokens(16) == 4 and cfg.output_tokens(36) == 4  # 4x4 and 6x6 grids pooled to 2x2
    for bad_grid in (15, 25):  # not a square; a 5x5 grid does not pool evenly to 2x2
        with pytest.raises(ValueError, match=f"{bad_grid}"):
            cfg.output_tokens(bad_grid)
    with pytest.raises(ValueError, match="tokens_per_image=5"):
        ProjectorConfig(kind="gemma3", tokens_per_image=5).output_tokens(16)


def test_projector_costs_count_the_pooled_tokens():
    """costs.projector_layer against the module itself: its parameter count, and the projection's FLOPs on the
    tokens it actually emits (3 images of 16 patches pooled to 4 tokens each)."""
    from mllm_jax import costs

    cfg = ProjectorConfig(kind="gemma3", tokens_per_image=TOKENS_PER_IMAGE)
    proj = Projector(cfg, 32, 48, rngs=nnx.Rngs(0))
    out = proj(jnp.zeros((3, 16, 32)))
    layer = costs.projector_layer("vision", cfg, 32, 48, 3 * 16, instances=3)
    assert layer.params == sum(v.size for v in jax.tree.leaves(nnx.state(proj, nnx.Param)))
    assert layer.weight_flops == 2.0 * out.shape[0] * out.shape[1] * 32 * 48
    with pytest.raises(ValueError, match="do not split over 5 instances"):
        costs.projector_layer("vision", cfg, 32, 48, 3 * 16, instances=5)


# --------------------------------------------------------------------------------------------------- config


# google/gemma-3-4b-it's config.json: the hub's text_config leaves most fields to Gemma3TextConfig's defaults.
HUB_4B = {"architectures": ["Gemma3ForConditionalGeneration"], "boi_token_index": 255999, "eoi_token_index": 256000,
          "image_token_index": 262144, "mm_tokens_per_image": 256, "model_type": "gemma3",
          "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
                          "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                          "sliding_window": 1024},
          "vision_config": {"hidden_size": 1152, "image_size": 896, "intermediate_size": 4304,
                            "model_type": "siglip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 27,
                            "patch_size": 14, "vision_use_head": False}}


def test_config_reads_the_hub_spelling_as_transformers_does():
    """The hub's sparse config.json and transformers' fully spelled-out reading of it give the same ModelConfig."""
    ours = cm.gemma3_from_hf(HUB_4B)
    spelled = transformers.Gemma3Config(**{k: v for k, v in HUB_4B.items() if k != "architectures"}).to_dict()
    assert cm.gemma3_from_hf(spelled) == ours
    llm, vision, proj = ours.llm, ours.encoders["vision"], ours.projectors["vision"]
    assert (llm.n_layers, llm.d_model, llm.n_heads, llm.n_kv_heads, llm.resolved_head_dim) == (34, 2560, 8, 4, 256)
    assert (llm.sliding_window, llm.sliding_window_pattern, llm.rope_linear_factor) == (1024, 6, 8.0)
    assert (llm.rope_theta, llm.rope_local_theta, llm.tie_embeddings) == (1e6, 1e4, True)
    assert (vision.kind, vision.class_token, vision.post_norm, vision.num_features) == ("siglip", False, True, 4096)
    assert (proj.kind, proj.tokens_per_image, proj.boi_token_id, proj.eoi_token_id) == ("gemma3", 256, 255999, 256000)
    assert ours.features_per_instance("vision") == 256 and ours.placeholder_ids == {"vision": 262144}
    assert ours.media_attention == "bidirectional"


def test_config_round_trip_and_refusals():
    cfg = cm.gemma3_from_hf(_hf_config().to_dict())
    back = cm.gemma3_to_hf(cfg)
    assert cm.gemma3_from_hf(back) == cfg and cm.config_from_hf(back) == cfg
    assert (back["image_token_index"], back["boi_token_index"], back["eoi_token_index"]) == (IMAGE, BOI, EOI)
    transformers.Gemma3Config(**{k: v for k, v in back.items() if k != "architectures"})  # transformers accepts it
    with pytest.raises(ValueError, match="mm_tokens_per_image=4 exceeds the text sliding_window=3"):
        cm.gemma3_from_hf({**back, "text_config": {**back["text_config"], "sliding_window": 3}})
    with pytest.raises(ValueError, match="tokens_per_image=9"):
        cm.gemma3_from_hf({**back, "mm_tokens_per_image": 9})  # a 4x4 grid does not pool to 3x3
    with pytest.raises(ValueError, match="media_attention='causal'"):
        cm.gemma3_to_hf(cfg.replace(media_attention="causal"))
    with pytest.raises(ValueError, match="'gemma3' projector"):
        cm.gemma3_to_hf(cfg.replace(projectors={"vision": ProjectorConfig(kind="mlp")}))
    bad_eps = dataclasses.replace(cfg.projectors["vision"], norm_eps=1e-5)
    with pytest.raises(ValueError, match="norm_eps=1e-05"):
        cm.gemma3_to_hf(cfg.replace(projectors={"vision": bad_eps}))


# --------------------------------------------------------------------------------------------------- parity


def test_span_mask_is_transformers_token_type_mask():
    """Our rule with one span per image is transformers' Gemma 3 mask: the full layers' causal-or-same-image and the
    local layers' window AND (causal-or-same-image), from its own create_masks_for_vision_model."""
    from transformers.models.gemma3 import modeling_gemma3 as mg

    ids, token_type_ids, _, batch = _inputs()
    text_cfg = _hf_config().text_config
    text_cfg._attn_implementation = "eager"
    masks = mg.create_masks_for_vision_model(
        config=text_cfg, inputs_embeds=torch.zeros(2, 20, 32), attention_mask=None, cache=None, position_ids=None,
        block_sequence_ids=mg.get_block_sequence_ids_for_mask(torch.tensor(token_type_ids)))
    meta = kernels.TokenMeta(*(np.asarray(batch[k]) for k in ("positions", "segment_ids", "span_ids")))
    for layer_type, window in (("full_attention", None), ("sliding_attention", WINDOW)):
        hf_mask = masks[layer_type][:, 0].numpy() == 0  # eager: additive float masks, 0 where attended
        np.testing.assert_array_equal(kernels.mask(meta, meta, window=window), hf_mask, err_msg=layer_type)
    # The images do see ahead inside their own run (the part a causal mask would miss).
    assert hf_mask[0, 13, 14] and not hf_mask[0, 8, 13]


def test_logits_with_three_images_match_transformers(hf_dir, ours):
    from mllm_jax import check_batch

    hf, _ = hf_dir
    ids, token_type_ids, pixels, batch = _inputs()
    check_batch({**jax.tree.map(np.asarray, batch), "labels": np.full(ids.shape, -100, np.int32)}, ours.config)
    ref = _hf_logits(hf, ids, token_type_ids, pixels)
    np.testing.assert_allclose(_our_logits(ours, batch), ref, atol=1e-4, rtol=1e-4)
    # The spans matter: without them (media_attention="causal" drops them) the image tokens attend causally, as
    # transformers' do without token_type_ids, and the logits move away from the bidirectional ones.
    causal = _our_logits(ours, dict(batch, span_ids=jnp.zeros_like(batch["span_ids"])))
    np.testing.assert_allclose(causal, _hf_logits(hf, ids, None, pixels), atol=1e-4, rtol=1e-4)
    assert np.abs(causal - ref).max() > 1e-2


def test_two_samples_packed_in_one_row_give_each_its_own_logits(hf_dir, ours):
    """The two rows packed into one row of 40 tokens (segments 1 and 2, positions restarting, three spans): each
    sample's logits are transformers' on that sample alone."""
    hf, _ = hf_dir
    ids, token_type_ids, pixels, batch = _inputs()
    ref = _hf_logits(hf, ids, token_type_ids, pixels)
    row = lambda a: jnp.reshape(jnp.asarray(a), (1, -1))  # noqa: E731
    fi = batch["feature_index"]["vision"]
    packed = dict(batch, input_ids=row(batch["input_ids"]), positions=row(batch["positions"]),
                  segment_ids=row(np.repeat([[1], [2]], 20, axis=1)), span_ids=row(batch["span_ids"]),
                  feature_index={"vision": row(fi)})
    out = _our_logits(ours, packed).reshape(2, 20, -1)
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=1e-4)


def test_processor_batch_gives_transformers_logits(hf_dir, ours, tmp_path):
    """Chat messages with a wide image (pan-and-scan: the image and its 2 crops) and a square one through our
    MultimodalProcessor (Gemma 3 framing), and the same rendered prompt and images through transformers'
    Gemma3Processor (Gemma3ImageProcessorPil) with the same tiny tokenizer: the same token ids and pixel rows, and
    our model on our batch gives transformers' logits on its inputs (token_type_ids included) to 1e-4."""
    from gemma3_testlib import make_tokenizers
    from mllm_jax.data.processor import MultimodalProcessor, get_template
    from mllm_jax.data.processor.gemma3 import BOI as BOI_TEXT
    from mllm_jax.data.processor.gemma3 import Gemma3ImageProcessor

    ours_tok, hf_tok = make_tokenizers(tmp_path)
    rng = np.random.default_rng(3)
    wide, square = (rng.integers(0, 256, shape, dtype=np.uint8) for shape in ((20, 44, 3), (24, 24, 3)))
    messages = [{"role": "user", "content": [{"type": "image", "image": wide}, {"type": "text", "text": "what is this"},
                                             {"type": "image", "image": square}]},
                {"role": "assistant", "content": "a cat and dog"}]
    pas = dict(do_pan_and_scan=True, pan_and_scan_min_crop_size=8)
    proc = MultimodalProcessor(ours_tok, ours.config, template="gemma", encoder_processors={
        "vision": Gemma3ImageProcessor.for_model(ours.config.encoders["vision"], **pas)})
    batch = proc([messages], seq_len=len(proc.encode(messages).ids))
    text = "".join(BOI_TEXT if p.modality else p.text for p in get_template("gemma").render(messages))
    hf_proc = transformers.Gemma3Processor(image_processor=transformers.Gemma3ImageProcessorPil(
        size={"height": 16, "width": 16}), tokenizer=hf_tok, image_seq_length=TOKENS_PER_IMAGE)
    ref = hf_proc(text=[text], images=[[wide, square]], return_tensors="np", **pas)
    np.testing.assert_array_equal(batch["input_ids"], ref["input_ids"])
    ref_pixels = ref["pixel_values"].transpose(0, 2, 3, 1)
    assert len(ref_pixels) == 4  # the wide image, its 2 crops, the square one
    np.testing.assert_allclose(batch["encoder_inputs"]["vision"], ref_pixels, atol=1e-5)
    keys = ("input_ids", "positions", "segment_ids", "span_ids", "encoder_inputs", "feature_index")
    np.testing.assert_allclose(_our_logits(ours, {k: batch[k] for k in keys}),
                               _hf_logits(hf_dir[0], ref["input_ids"], ref["token_type_ids"], ref_pixels),
                               atol=1e-4, rtol=1e-4)


def test_save_reloads_in_transformers_with_the_same_logits(hf_dir, ours, tmp_path):
    ids, token_type_ids, pixels, batch = _inputs()
    save_pretrained(ours, str(tmp_path / "ours"))
    with open(tmp_path / "ours" / "config.json") as f:
        assert json.load(f)["architectures"] == ["Gemma3ForConditionalGeneration"]
    back = transformers.Gemma3ForConditionalGeneration.from_pretrained(str(tmp_path / "ours")).eval()
    np.testing.assert_allclose(_hf_logits(back, ids, token_type_ids, pixels), _our_logits(ours, batch),
                               atol=1e-4, rtol=1e-4)
    again = load_pretrained(str(tmp_path / "ours"))
    assert again.config == ours.config
    for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(ours, nnx.Param)),
                                 nnx.to_flat_state(nnx.state(again, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()), err_msg=str(path))


def test_sharded_forward_equals_one_device(ours):
    """The imported model on fsdp=2 x tensor=2 (weights placed as build.create_model lays them out, the images spread
    over the devices) gives the one-device logits."""
    from mllm_jax.build import abstract_model
    from mllm_jax.parallel.config import ParallelConfig
    from mllm_jax.parallel.mesh import make_mesh
    from model_testlib import place

    batch = _inputs()[3]
    one = _our_logits(ours, batch)
    pc = ParallelConfig(fsdp=2, tensor=2)
    mesh = make_mesh(pc, devices=jax.devices()[:4])
    gdef, state = place(ours, abstract_model(ours.config, mesh, pc), mesh)
    assert not state["projectors"]["vision"]["proj"]["kernel"].get_value().sharding.is_fully_replicated
    with jax.set_mesh(mesh):
        sharded = jax.jit(lambda s, b: (lambda m: m.llm.logits(m(b)))(nnx.merge(gdef, s)))(state, batch)
    np.testing.assert_allclose(np.asarray(sharded), one, atol=1e-5, rtol=1e-5)
