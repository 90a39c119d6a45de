"""M-RoPE (Qwen2-VL / Qwen2.5-VL multimodal rotary positions) in the LLM, and ModelConfig.media_attention.

Oracles: transformers' Qwen2VLTextModel / Qwen2_5_VLTextModel given 3-D position_ids (fp32, 1e-4); the 1-D RoPE
model on the same weights (text-only M-RoPE is 1-D RoPE); the one-device loss and gradients (context and data x fsdp
layouts on 8 fake CPU devices, the pipelined step); the full forward of prompt + generated tokens (decode); a run whose
span_ids are zero (media_attention="causal")."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from mllm_jax.config import LLMConfig, ModelConfig
from mllm_jax.kernels.meta import TokenMeta
from mllm_jax.llm import LLM
from mllm_jax.multimodal import MultimodalModel
from tests.model_testlib import build, jit_call

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# head_dim 8: four frequencies, cut (1, 1, 2) into temporal / height / width
MROPE_LLM = LLMConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, qkv_bias=True,
                      mrope_section=(1, 1, 2))


def rope_row(parts) -> np.ndarray:
    """[S, 3] rope positions as HF get_rope_index lays them out: ("text", n) advances every axis together;
    ("image", t, h, w) is a grid starting where the text stopped; the next part starts after the grid's largest
    position."""
    out, start = [], 0
    for kind, *dims in parts:
        if kind == "text":
            p = start + np.arange(dims[0])
            out.append(np.stack([p, p, p], axis=-1))
            start += dims[0]
        else:
            t, h, w = dims
            grid = np.stack(np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij"), axis=-1)
            out.append(start + grid.reshape(-1, 3))
            start += max(t, h, w)
    return np.concatenate(out).astype(np.int32)


# ---------------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_hidden_states_match_transformers_text_model(tmp_path, family):
    from mllm_jax.hf import load_pretrained
    from mllm_jax.hf.config_map import llm_from_hf, llm_to_hf

    cls, cfg_cls = {"qwen2_vl": (transformers.Qwen2VLTextModel, transformers.Qwen2VLTextConfig),
                    "qwen2_5_vl": (transformers.Qwen2_5_VLTextModel, transformers.Qwen2_5_VLTextConfig)}[family]
    hf_cfg = cfg_cls(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, intermediate_size=48,
                     rope_parameters=dict(rope_type="default", mrope_section=[2, 3, 3], rope_theta=10000.0))
    torch.manual_seed(0)
    hf = cls(hf_cfg)
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.2)
    hf.eval()
    rope = np.stack([rope_row([("text", 3), ("image", 1, 2, 3), ("text", 4)]),
                     rope_row([("text", 2), ("image", 2, 2, 2), ("text", 3)])])  # [2, 13, 3]
    ids = np.random.default_rng(0).integers(0, 64, rope.shape[:2])
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), position_ids=torch.tensor(rope.transpose(2, 0, 1)).long())
    hf.save_pretrained(str(tmp_path / family))
    cfg = llm_from_hf(hf_cfg.to_dict())
    assert cfg.mrope_section == (2, 3, 3) and cfg.qkv_bias
    # the transformers-4 spelling of the hub's configs, and our export read back by transformers
    old = {**hf_cfg.to_dict(), "rope_parameters": None, "rope_theta": 10000.0,
           "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]}}
    assert llm_from_hf(old) == cfg
    assert llm_from_hf(cfg_cls(**llm_to_hf(cfg, hf_cfg.model_type)).to_dict()) == dataclasses.replace(cfg, head_dim=16)
    # The text model has no head; tying the embedding stands in for it (the hidden states are compared).
    ours = load_pretrained(str(tmp_path / family), config=dataclasses.replace(cfg, tie_embeddings=True))
    meta = TokenMeta.causal(*ids.shape, xp=np)
    got = ours.hidden(ours.embed_tokens(jnp.asarray(ids)), meta, rope_positions=rope)
    np.testing.assert_allclose(np.asarray(got), ref.last_hidden_state.numpy(), atol=1e-4, rtol=1e-4)


def test_text_only_mrope_is_1d_rope():
    """No rope_positions (or the causal positions on all three axes) gives the 1-D RoPE model's logits, also for
    packed positions (the broadcast reads meta.positions, not an arange)."""
    plain = build(LLM, dataclasses.replace(MROPE_LLM, mrope_section=None))
    mrope = build(LLM, MROPE_LLM)
    for m in (plain, mrope):  # weights 10x the init's 0.02, so attention is far from uniform and angles show
        nnx.update(m, jax.tree.map(lambda x: 10 * x, nnx.state(m, nnx.Param)))
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 64, (2, 12)))
    pos = np.tile(np.concatenate([np.arange(5), np.arange(7)]), (2, 1)).astype(np.int32)
    meta = TokenMeta(pos, np.tile(np.repeat([1, 2], [5, 7]), (2, 1)).astype(np.int32), np.zeros_like(pos))
    want = np.asarray(jit_call(lambda m, i, t: m(i, t), plain, ids, meta))
    np.testing.assert_allclose(np.asarray(jit_call(lambda m, i, t: m(i, t), mrope, ids, meta)), want, atol=1e-5)
    def with_rope(rope):
        return np.asarray(jit_call(lambda m, i, t, r: m(i, t, rope_positions=r), mrope, ids, meta, rope))

    np.testing.assert_allclose(with_rope(np.stack([pos] * 3, -1)), want, atol=1e-5)
    spatial = np.stack([pos, pos // 2, pos], -1)  # other height positions change the angles: the axes are read
    assert np.abs(with_rope(spatial) - want).max() > 1e-3


def test_bad_rope_inputs_are_refused():
    ids = jnp.zeros((1, 4), jnp.int32)
    plain = build(LLM, dataclasses.replace(MROPE_LLM, mrope_section=None))
    with pytest.raises(ValueError, match="mrope_section is None"):
        plain(ids, rope_positions=np.zeros((1, 4, 3), np.int32))
    with pytest.raises(ValueError, match=r"\[B, S, 3\]"):
        build(LLM, MROPE_LLM)(ids, rope_positions=np.zeros((1, 4), np.int32))
    with pytest.raises(ValueError, match="mrope_section"):
        LLM(dataclasses.replace(MROPE_LLM, mrope_section=(1, 1, 1)), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="media_attention"):
        MultimodalModel(ModelConfig(llm=MROPE_LLM, media_attention="full"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="span_isolated"):
        MultimodalModel(ModelConfig(llm=MROPE_LLM, media_attention="causal", span_isolated=True), rngs=nnx.Rngs(0))


# ------------------------------------------------------------------------------------------- media_attention


def _packed_batch(b, s, seed):
    """Packed samples with spans, labels shifted before any permutation, and non-trivial rope positions (a spatial
    offset on the height and width axes of the span tokens)."""
    from tests.test_context_planner import random_meta

    rng = np.random.default_rng(seed)
    meta = random_meta(b, s, rng)
    ids = rng.integers(1, 64, (b, s)).astype(np.int32)
    labels = np.concatenate([ids[:, 1:], np.full((b, 1), -100, np.int32)], axis=1)
    labels = np.where(meta.segment_ids != 0, labels, -100)
    in_span = meta.span_ids != 0
    rope = np.stack([meta.positions, meta.positions + in_span * rng.integers(0, 4, (b, s)),
                     meta.positions + in_span * rng.integers(0, 4, (b, s))], axis=-1).astype(np.int32)
    return dict(input_ids=ids, labels=labels, positions=meta.positions, segment_ids=meta.segment_ids,
                span_ids=meta.span_ids, rope_positions=rope)


def test_causal_media_attention_equals_zero_span_ids():
    batch = _packed_batch(2, 32, seed=2)
    assert (batch["span_ids"] != 0).any()

    def loss(config, b):
        total, count = jit_call(lambda m, bb: m.loss(bb), build(MultimodalModel, config), b)
        return float(total / count)

    bidirectional = ModelConfig(llm=MROPE_LLM)
    causal = loss(bidirectional.replace(media_attention="causal"), batch)
    assert causal == pytest.approx(loss(bidirectional, {**batch, "span_ids": np.zeros_like(batch["span_ids"])}),
                                   rel=1e-6)
    assert abs(causal - loss(bidirectional, batch)) > 1e-5  # the spans matter here: the test can see a difference


# --------------------------------------------------------------------------------- layouts on 8 fake devices


@pytest.mark.slow
def test_context_and_data_fsdp_layouts_give_the_one_device_loss_and_grads():
    """The batch permuted by data.context_batches (rope_positions moved with the tokens) and placed by
    data.placement ([B, S, 3] sharded like the tokens): loss and every gradient equal one device's."""
    from mllm_jax.build import abstract_model, create_model
    from mllm_jax.data.context_batches import permute_for_context
    from mllm_jax.data.placement import put_batch
    from mllm_jax.parallel.config import ContextConfig, ParallelConfig
    from mllm_jax.parallel.mesh import make_mesh

    cfg = ModelConfig(llm=MROPE_LLM)
    batch = _packed_batch(2, 64, seed=3)
    one = ParallelConfig()
    model = create_model(cfg, make_mesh(one, devices=jax.devices()[:1]), one, seed=0)

    def run(pc, b):
        mesh = make_mesh(pc, devices=jax.devices()[: pc.num_devices])
        gdef, abs_params, abs_rest = nnx.split(abstract_model(cfg, mesh, pc, seed=0), nnx.Param, ...)
        _, params, rest = nnx.split(model, nnx.Param, ...)
        place = lambda x, a: jax.device_put(x, NamedSharding(mesh, a.sharding.spec))  # noqa: E731
        params, rest = jax.tree.map(place, params, abs_params), jax.tree.map(place, rest, abs_rest)

        def loss(p, bb):
            total, count = nnx.merge(gdef, p, rest).loss(bb)
            return total / count

        with jax.set_mesh(mesh):
            placed = put_batch(b, mesh, leading=0)
            if pc.context > 1:
                assert placed["rope_positions"].sharding.spec[1] == "context"
            value, grads = jax.jit(jax.value_and_grad(loss))(params, placed)
        return float(value), [np.asarray(g) for g in jax.tree.leaves(grads)]

    ref_loss, ref_grads = run(one, batch)
    # context alone, and with the rows over data x fsdp (every axis a [B, S, 3] array is sharded over)
    for pc in (ParallelConfig(context=2, context_config=ContextConfig(block=16, mode="balanced")),
               ParallelConfig(data=2, fsdp=2, context=2, context_config=ContextConfig(block=16, mode="zigzag"))):
        permuted, plan = permute_for_context(batch, pc, leading=0)
        assert not np.array_equal(plan.permutation, np.tile(np.arange(64), (2, 1)))  # tokens really moved
        loss, grads = run(pc, permuted)
        assert loss == pytest.approx(ref_loss, rel=1e-5), pc
        for g, r in zip(grads, ref_grads):
            np.testing.assert_allclose(g, r, atol=2e-5, rtol=1e-4, err_msg=str(pc))


@pytest.mark.slow
def test_pipelined_step_with_mrope_and_causal_media_matches_one_device():
    """rope_positions ride with the microbatches into the pipeline stages; media_attention reaches them too."""
    from mllm_jax.freeze import trainable_filter
    from mllm_jax.parallel.config import ParallelConfig
    from mllm_jax.parallel.mesh import make_mesh
    from mllm_jax.train.pipelined_step import pipelined_loss_and_grad
    from tests.test_pipeline_llm import concatenated, make_batch, tiny_config

    config = tiny_config(2, mrope_section=(1, 1, 2)).replace(media_attention="causal")
    batch = make_batch(2, 2)
    rng = np.random.default_rng(4)
    spans = batch["span_ids"] != 0
    pos = batch["positions"]
    batch["rope_positions"] = np.stack([pos, pos + spans * rng.integers(0, 3, pos.shape),
                                        pos + spans * rng.integers(0, 3, pos.shape)], -1).astype(np.int32)
    model = build(MultimodalModel, config)
    gdef, trainable, rest = nnx.split(model, trainable_filter(config), ...)

    def one_device(tr, b):  # the oracle: the plain model's loss over the concatenated microbatches
        total, count = nnx.merge(gdef, tr, rest).loss(b)
        return total / count

    want_loss, want = jax.jit(jax.value_and_grad(one_device))(trainable, concatenated(batch))
    parallel = ParallelConfig(pipeline=2, microbatches=2)
    mesh = make_mesh(parallel, jax.devices()[:2])
    gdef_all, st = nnx.split(model)
    run = jax.jit(lambda s_, b: pipelined_loss_and_grad(nnx.merge(gdef_all, s_), b, mesh=mesh, parallel_config=parallel,
                                                    stage_layers=(1, 1)))
    with jax.set_mesh(mesh):
        loss_sum, count, grads = run(jax.device_put(st, NamedSharding(mesh, P())), batch)
    np.testing.assert_allclose(loss_sum / count, want_loss, rtol=2e-5)
    want_flat, got_flat = dict(nnx.to_flat_state(want)), dict(nnx.to_flat_state(grads))
    assert sorted(got_flat) == sorted(want_flat)
    for path, w in want_flat.items():
        np.testing.assert_allclose(np.asarray(got_flat[path][...]), np.asarray(w[...]), rtol=2e-4, atol=2e-6,
                                   err_msg="/".join(map(str, path)))


# ---------------------------------------------------------------------------------------------------- decode


def test_generate_continues_text_after_the_largest_rope_position():
    """Greedy generation with an image prompt (M-RoPE, causal media): each step's logits equal the full forward of
    prompt + generated tokens whose rope positions continue from the prompt's largest + 1 (HF get_rope_index's
    rope_deltas), per row of a left-padded batch of two prompt lengths."""
    from mllm_jax.decode import generate
    from tests.test_pipeline_llm import FEATS, PLACEHOLDER, tiny_config

    config = tiny_config(2, mrope_section=(1, 1, 2)).replace(media_attention="causal")
    model = build(MultimodalModel, config)
    rng = np.random.default_rng(5)
    rows = [[("text", 2), ("image", 1, 2, 2), ("text", 3)], [("text", 1), ("image", 1, 2, 2), ("text", 1)]]
    lengths = [9, 6]
    s = max(lengths)
    ids, pos, seg, span, fi = (np.zeros((2, s), np.int32) for _ in range(5))
    fi[:] = -1
    rope = np.zeros((2, s, 3), np.int32)
    for r, (parts, n) in enumerate(zip(rows, lengths)):
        start = parts[0][1]
        ids[r, :n] = rng.integers(4, 64, n)
        ids[r, start:start + FEATS] = PLACEHOLDER
        span[r, start:start + FEATS] = 1
        fi[r, start:start + FEATS] = r * FEATS + np.arange(FEATS)
        pos[r, :n], seg[r, :n], rope[r, :n] = np.arange(n), 1, rope_row(parts)
    pixels = rng.normal(size=(2, 8, 8, 3)).astype(np.float32)
    batch = dict(input_ids=ids, positions=pos, segment_ids=seg, span_ids=span, rope_positions=rope,
                 encoder_inputs={"vision": pixels}, feature_index={"vision": fi})
    out = generate(model, batch, max_new_tokens=3, return_logits=True)
    # The oracle batch: each row's prompt and its first two generated tokens (the third is predicted from them),
    # right-padded to one length so one forward serves both rows.
    width = s + 2
    full = dict(input_ids=np.zeros((2, width), np.int32), positions=np.zeros((2, width), np.int32),
                segment_ids=np.zeros((2, width), np.int32), span_ids=np.zeros((2, width), np.int32),
                rope_positions=np.zeros((2, width, 3), np.int32), encoder_inputs={"vision": pixels},
                feature_index={"vision": np.full((2, width), -1, np.int32)})
    for r, n in enumerate(lengths):
        full["input_ids"][r, :n + 2] = np.concatenate([ids[r, :n], out.tokens[r, :2]])
        full["positions"][r, :n + 2] = np.arange(n + 2)
        full["segment_ids"][r, :n + 2] = 1
        full["span_ids"][r, :n] = span[r, :n]
        top = rope[r, :n].max()
        full["rope_positions"][r, :n + 2] = np.concatenate([rope[r, :n], np.repeat(top + 1 + np.arange(2), 3)
                                                            .reshape(2, 3)])
        full["feature_index"]["vision"][r, :n] = fi[r, :n]
    logits = np.asarray(jit_call(lambda m, b: m.llm.logits(m(b)), model, full))
    for r, n in enumerate(lengths):
        np.testing.assert_allclose(out.logits[r], logits[r, n - 1:n + 2], atol=1e-4, rtol=1e-4, err_msg=f"row {r}")
