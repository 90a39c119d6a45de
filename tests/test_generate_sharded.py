"""Generation on a model laid out with the training layouts (mllm_jax.decode on a mesh): the oracle is the same
weights on one device, which must generate exactly the same greedy tokens (and the same logits to float round-off),
for a batch of multimodal and text prompts of different lengths. Layouts: data=2 x fsdp=2 x tensor=2 (rows over
data x fsdp, K/V heads and the vocabulary over tensor, weights FSDP-stored and gathered per layer) and fsdp=8.
Layouts generation does not support are refused naming the axis."""

import contextlib

import jax
import numpy as np
import pytest
from flax import nnx

from mllm_jax import decode
from mllm_jax.build import abstract_model
from mllm_jax.multimodal import MultimodalModel
from mllm_jax.parallel.config import ParallelConfig
from mllm_jax.parallel.mesh import make_mesh
from model_testlib import VISION_ID, build, place, tiny_batch, tiny_config

CUTS = [16, 9, 5, 12, 7, 16, 3, 10]  # prompt lengths; rows 0 and 1 hold an image (tokens 2..5, 3..6)
STEPS = 5


def _vision_only():
    full = tiny_config()
    return full.replace(**{k: {"vision": getattr(full, k)["vision"]}
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


@pytest.fixture(scope="module")
def setup():
    cfg = _vision_only()
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


def test_unsupported_layouts_and_meshes_are_refused_naming_them(setup):
    cfg, model = setup
    batch = _prompts(cfg, 2)
    pc = ParallelConfig(data=4, context=2)
    mesh = make_mesh(pc)
    sharded = nnx.merge(*place(model, abstract_model(cfg, mesh, pc), mesh))
    with pytest.raises(ValueError, match=r"\{'context': 2\}.*not implemented"):
        decode.generate(sharded, batch, max_new_tokens=2)
    with jax.set_mesh(mesh), pytest.raises(ValueError, match="on one device but generate was called under a mesh "
                                                             "of 8 devices"):
        decode.generate(model, batch, max_new_tokens=2)
    other = make_mesh(ParallelConfig(data=8))
    good = make_mesh(ParallelConfig(fsdp=8))
    on_fsdp = nnx.merge(*place(model, abstract_model(cfg, good, ParallelConfig(fsdp=8)), good))
    with jax.set_mesh(other), pytest.raises(ValueError, match="called under a mesh .*'data': 8.* lie on a mesh"):
        decode.generate(on_fsdp, batch, max_new_tokens=2)
