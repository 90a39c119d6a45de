"""Context parallelism inside the model: loss and gradients of a tiny LLM on a permuted (parallel.context) and
context-sharded batch equal those of context = 1 on the original order, alone and with data and tensor parallelism,
at a short length (every planner mode) and at the lengths users train at (2048 and 4096 tokens).

The context = 1 reference is part of the oracle: if it breaks, the test fails (it is never skipped)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding

from mllm_jax.parallel.config import ContextConfig, ParallelConfig
from mllm_jax.parallel.context import MODES, permute_batch, plan
from tests.test_context_planner import random_meta


def _setup(s=128):
    from mllm_jax.config import LLMConfig, ModelConfig

    cfg = ModelConfig(llm=LLMConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                                    max_position_embeddings=max(s, 2048)))
    rng = np.random.default_rng(0)
    b = 2
    meta = random_meta(b, s, rng)
    ids = rng.integers(1, 64, (b, s)).astype(np.int32)
    labels = np.concatenate([ids[:, 1:], np.full((b, 1), -100, np.int32)], axis=1)  # shifted before permuting
    labels = np.where(meta.segment_ids != 0, labels, -100)
    batch = dict(input_ids=ids, labels=labels, positions=meta.positions, segment_ids=meta.segment_ids,
                 span_ids=meta.span_ids)
    return cfg, meta, batch


def _reference_model(cfg):
    """The one model every layout runs: created by build.create_model on one device (context = 1)."""
    from mllm_jax.build import create_model
    from mllm_jax.parallel.mesh import make_mesh

    pc = ParallelConfig()
    return create_model(cfg, make_mesh(pc, devices=jax.devices()[:1]), pc, seed=0)


def _runner(cfg, pc, model):
    """batch -> (loss, grads) on ``pc``'s mesh with ``model``'s parameters placed as build would place them there.

    One jit per layout, reused for every planner mode (the modes only permute the batch, so it compiles once per
    shape). The parameters are the one model's, moved into the layout's shardings (build.abstract_model), so every
    layout provably starts from identical weights."""
    from flax import nnx

    from mllm_jax.build import abstract_model
    from mllm_jax.parallel.mesh import make_mesh

    mesh = make_mesh(pc, devices=jax.devices()[: pc.num_devices])
    gdef, abs_params, abs_rest = nnx.split(abstract_model(cfg, mesh, pc, seed=0), nnx.Param, ...)
    _, params, rest = nnx.split(model, nnx.Param, ...)
    place = lambda x, a: jax.device_put(x, NamedSharding(mesh, a.sharding.spec))  # noqa: E731 (abstract -> mesh)
    params, rest = jax.tree.map(place, params, abs_params), jax.tree.map(place, rest, abs_rest)

    @jax.jit
    def run(params, batch):
        def loss(p):
            total, count = nnx.merge(gdef, p, rest).loss(batch)
            return total / count  # the global sum over the global label count

        return jax.value_and_grad(loss)(params)

    def call(batch):
        with jax.set_mesh(mesh):
            loss, grads = run(params, jax.tree.map(jnp.asarray, batch))
        return float(loss), [np.asarray(g) for g in jax.tree.leaves(grads)]

    return call


def _check_layouts(s, layouts, block):
    cfg, meta, batch = _setup(s)
    model = _reference_model(cfg)
    ref_loss, ref_grads = _runner(cfg, ParallelConfig(), model)(batch)
    for lay in layouts:
        pc = ParallelConfig(data=lay.get("data", 1), context=lay["context"], tensor=lay.get("tensor", 1),
                            context_config=ContextConfig(block=block, attention=lay["attention"]))
        run = _runner(cfg, pc, model)
        for mode in lay["modes"]:
            p = plan(meta, pc.context, mode, block=block, tile_k=block // 2)
            loss, grads = run(permute_batch(batch, p))
            assert loss == pytest.approx(ref_loss, rel=1e-5), (s, lay, mode)
            for g, r in zip(grads, ref_grads):
                np.testing.assert_allclose(g, r, atol=2e-5, rtol=1e-4, err_msg=f"{s} {lay} {mode}")


@pytest.mark.slow
def test_model_loss_and_grads_equal_context_1_for_every_mode():
    _check_layouts(128, [dict(context=2, attention="allgather", modes=MODES),
                         dict(data=2, context=2, tensor=2, attention="ring", modes=("lpt", "balanced"))], block=16)


@pytest.mark.slow
@pytest.mark.parametrize("s", [2048, 4096])
def test_model_loss_and_grads_equal_context_1_at_training_lengths(s):
    _check_layouts(s, [dict(context=4, attention="allgather", modes=("balanced",)),
                       dict(data=2, context=2, tensor=2, attention="ring", modes=("zigzag",))], block=128)
