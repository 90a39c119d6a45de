"""Generation on a model laid out with the training layouts (mllm_jax.decode on a mesh): the oracle is the same
weights on one device, which must generate exactly the same greedy tokens (and the same logits to float round-off),
for a batch of multimodal and text prompts of different lengths. Layouts: data=2 x fsdp=2 x tensor=2 (rows over
data x fsdp, K/V heads and the vocabulary over tensor, weights FSDP-stored and gathered per layer) and fsdp=8; with a
`context` axis the prompt's prefill runs context-parallel on the planner's permutation (context=2, data=2 x
context=2, fsdp=2 x context=2 x tensor=2 with ring attention). Layouts generation does not support are refused naming
the axis."""

import contextlib
import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from mllm_jax import decode
from mllm_jax.build import abstract_model
from mllm_jax.multimodal import MultimodalModel
from mllm_jax.parallel.config import ContextConfig, ParallelConfig
from mllm_jax.parallel.mesh import make_mesh
from model_testlib import VISION_ID, build, place, tiny_batch, tiny_config

CUTS = [16, 9, 5, 12, 7, 16, 3, 10]  # prompt lengths; rows 0 and 1 hold an image (tokens 2..5, 3..6)
STEPS = 5


def _vision_only():
    """The tiny model with its vision tower only and a Gemma-3-like LLM: a sliding window that cuts into the prompts
    on layer 0 (layer 1 global, so the layer runs split by window), the local layers' own RoPE base, q/k norms and
    attention soft-capping."""
    full = tiny_config()
    llm = dataclasses.replace(full.llm, sliding_window=6, sliding_window_pattern=2, rope_local_theta=1000.0,
                              qk_norm=True, attn_logit_softcap=20.0)
    return full.replace(llm=llm, **{k: {"vision": getattr(full, k)["vision"]}
                                    for k in ("encoders", "projectors", "placeholder_ids")})


def _randomize(model, seed=1, std=0.3):
    state = nnx.state(model, nnx.Param)
    leaves, tree = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    nnx.update(model, jax.tree.unflatten(tree, [x + std * jax.random.normal(k, x.shape, x.dtype)
                                                for x, k in zip(leaves, keys)]))
    return model


def _prompts(cfg, rows):
    batch = tiny_batch(cfg, batch=rows, length=16, with_audio=False, seed=3)
    batch.pop("labels")
    for r, n in enumerate(CUTS[:rows]):
        for key in ("input_ids", "segment_ids", "span_ids", "positions"):
            batch[key][r, n:] = 0
        batch["feature_index"]["vision"][r, n:] = -1
    assert (batch["input_ids"][:2] == VISION_ID).sum(1).tolist() == [4, 4]
    return batch


def _with_mrope_positions(batch):
    """The batch with Qwen2-VL-style M-RoPE positions [B, S, 3]: a text token (t, t, t), an image's 2 x 2 grid of
    tokens (t, t + row, t + col), the text after it from the image's largest position + 1 (padding 0)."""
    ids, seg = batch["input_ids"], batch["segment_ids"]
    rope = np.zeros(ids.shape + (3,), np.int32)
    for r in range(ids.shape[0]):
        t, j = 0, 0
        while j < ids.shape[1] and seg[r, j]:
            if ids[r, j] == VISION_ID:  # the four placeholders of one image
                rope[r, j:j + 4] = [[t, t + i // 2, t + i % 2] for i in range(4)]
                t, j = t + 2, j + 4
            else:
                rope[r, j], t, j = t, t + 1, j + 1
    return {**batch, "rope_positions": rope}


@pytest.fixture(scope="module")
def setup():
    cfg = _vision_only()
    return cfg, _randomize(build(MultimodalModel, cfg))


@pytest.fixture(scope="module")
def mrope_setup():
    """The tiny model with an M-RoPE LLM (Qwen2-VL's rotary sections over head_dim / 2 = 4)."""
    full = _vision_only()
    cfg = full.replace(llm=dataclasses.replace(tiny_config().llm, mrope_section=(2, 1, 1)))
    return cfg, _randomize(build(MultimodalModel, cfg))


@pytest.mark.parametrize("rows,layout", [(4, dict(data=2, fsdp=2, tensor=2)), (8, dict(fsdp=8))],
                         ids=["data2_fsdp2_tensor2", "fsdp8"])
def test_sharded_greedy_generation_equals_one_device(setup, rows, layout):
    cfg, model = setup
    batch = _prompts(cfg, rows)
    ref = decode.generate(model, batch, max_new_tokens=STEPS, return_logits=True)
    pc = ParallelConfig(**layout)
    mesh = make_mesh(pc)
    sharded = nnx.merge(*place(model, abstract_model(cfg, mesh, pc), mesh))
    used = {a for x in jax.tree.leaves(nnx.state(sharded.llm, nnx.Param)) for e in x.sharding.spec if e
            for a in ((e,) if isinstance(e, str) else e)}
    assert "fsdp" in used, used  # the weights in their training storage (FSDP-sharded)
    assert decode.runs_sharded(sharded) and not decode.runs_sharded(model)
    # fsdp=8: called under the model's own mesh, as the training loop's evaluation does
    with jax.set_mesh(mesh) if "fsdp" in layout and len(layout) == 1 else contextlib.nullcontext():
        out = decode.generate(sharded, batch, max_new_tokens=STEPS, return_logits=True)
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    np.testing.assert_array_equal(out.lengths, ref.lengths)
    np.testing.assert_allclose(out.logits, ref.logits, atol=2e-4, rtol=2e-4)


@pytest.mark.slow
@pytest.mark.parametrize("rows,layout,plan", [
    (2, dict(context=2), ContextConfig(mode="zigzag", block=4)),
    (4, dict(data=2, context=2), ContextConfig(mode="balanced", block=4)),
    (4, dict(fsdp=2, context=2, tensor=2), ContextConfig(mode="zigzag", block=4, attention="ring")),
], ids=["context2_mrope", "data2_context2", "fsdp2_context2_tensor2_ring"])
def test_context_parallel_prefill_generates_like_one_device(request, rows, layout, plan):
    """The prompt's prefill runs on the planner's permutation with the sequence sharded over `context` (as a training
    step), writes the cache in the left-aligned order, and the decode reads it: the one-device tokens and logits.
    context=2 runs the M-RoPE model, its image tokens' 3-D positions permuted with the tokens."""
    mrope = len(layout) == 1
    cfg, model = request.getfixturevalue("mrope_setup" if mrope else "setup")
    batch = _prompts(cfg, rows)
    if mrope:
        batch = _with_mrope_positions(batch)
    ref = decode.generate(model, batch, max_new_tokens=STEPS, return_logits=True)
    # The plan really moves tokens (a cache written in slot order instead of token order would differ) and pads the
    # 16-token prompts to no more than cp x block per rank.
    permuted, order = decode.context_permute(decode.left_align(batch), 2, plan, cfg)
    assert order.shape == (rows, 16) and (order != np.arange(16)).any(), order
    assert permuted["input_ids"].shape == (rows, 16)
    pc = ParallelConfig(**layout, context_config=plan)
    mesh = make_mesh(pc, jax.devices()[:pc.data * pc.fsdp * pc.context * pc.tensor])
    sharded = nnx.merge(*place(model, abstract_model(cfg, mesh, pc), mesh))
    assert sharded.llm.run.context_method == plan.attention and decode.runs_sharded(sharded)
    out = decode.generate(sharded, batch, max_new_tokens=STEPS, return_logits=True, context_config=plan)
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    np.testing.assert_array_equal(out.lengths, ref.lengths)
    np.testing.assert_allclose(out.logits, ref.logits, atol=2e-4, rtol=2e-4)
    if "data" in layout:
        # The cache itself (the masks read metadata, so a cache in slot order would decode the same tokens): the
        # context-parallel prefill's K/V and metadata lie in the one-device prefill's slots.
        got, want = _prefill_cache(sharded, permuted, order, mesh), _prefill_cache(model, decode.left_align(batch))
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=2e-5)


def _prefill_cache(model, left, order=None, mesh=None):
    """decode.prefill's cache under jit: on one device, or on the model's mesh from the permuted batch (placed as
    decode.generate places it) and its order."""
    from mllm_jax.data.placement import put_batch

    graphdef, state = nnx.split(model)

    def run(state, batch, order):
        m = nnx.merge(graphdef, state)
        with m.scope("llm"):
            return decode.prefill(m, batch, 16 + STEPS, order)[1]

    if mesh is None:
        return jax.jit(run)(state, left, None)
    with jax.set_mesh(mesh):
        return jax.jit(run)(state, put_batch(left, mesh, leading=0, rule_table=model.rule_table), order)


def test_unsupported_layouts_and_meshes_are_refused_naming_them(setup):
    cfg, model = setup
    batch = _prompts(cfg, 2)
    for layout, named in ((dict(data=4, pipeline=2), r"\{'pipeline': 2\}"),
                          (dict(data=4, expert=2), r"\{'expert': 2\}")):
        pc = ParallelConfig(**layout)
        mesh = make_mesh(pc)
        sharded = nnx.merge(*place(model, abstract_model(cfg, mesh, pc), mesh))
        assert not decode.runs_sharded(sharded)
        with pytest.raises(ValueError, match=named + r".*not implemented for generation"):
            decode.generate(sharded, batch, max_new_tokens=2)
    with jax.set_mesh(mesh), pytest.raises(ValueError, match="on one device but generate was called under a mesh "
                                                             "of 8 devices"):
        decode.generate(model, batch, max_new_tokens=2)
    other = make_mesh(ParallelConfig(data=8))
    good = make_mesh(ParallelConfig(fsdp=8))
    on_fsdp = nnx.merge(*place(model, abstract_model(cfg, good, ParallelConfig(fsdp=8)), good))
    with jax.set_mesh(other), pytest.raises(ValueError, match="called under a mesh .*'data': 8.* lie on a mesh"):
        decode.generate(on_fsdp, batch, max_new_tokens=2)
