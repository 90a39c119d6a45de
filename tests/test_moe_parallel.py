"""Expert parallelism composes with every layout: on 8 fake CPU devices the loss and the gradients of the MoE
objective (cross entropy + router aux and z losses) equal one device's, for experts split over `expert` alone and
with data, fsdp + tensor, context, and inside pipeline stages; the all-to-all is in the compiled program.

Oracle: the same weights and batch on one device (train.step.moe_model_loss summed over the microbatches). The
layouts only reorder float32 sums (sharded matmuls, psums of the router statistics), hence 1e-5."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mllm_jax.build import create_model
from mllm_jax.config import LLMConfig, ModelConfig, ProjectorConfig, VisionConfig
from mllm_jax.data import SyntheticBatches, TextCodec
from mllm_jax.data.placement import put_batch
from mllm_jax.freeze import trainable_filter
from mllm_jax.multimodal import MultimodalModel
from mllm_jax.parallel.config import ParallelConfig
from mllm_jax.parallel.mesh import make_mesh
from mllm_jax.parallel.sharding import rule_table
from mllm_jax.train.config import DataConfig
from mllm_jax.train.step import moe_model_loss


CODEC = TextCodec()
M = 2  # microbatches (the pipeline needs them; every layout runs the same two)
CFG = ModelConfig(
    llm=LLMConfig(vocab_size=-(-CODEC.vocab_size // 8) * 8, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48,
                  n_experts=8, experts_per_token=2, moe_d_ff=16, shared_expert_d_ff=16, shared_expert_gate=True,
                  router_aux_loss_coef=0.1, router_z_loss_coef=0.01),
    encoders={"vision": VisionConfig(kind="vit", image_size=8, patch_size=4, d_model=16, n_layers=1, n_heads=2,
                                     d_ff=32, class_token=False, pre_norm=False)},
    projectors={"vision": ProjectorConfig(kind="mlp")},
    placeholder_ids={"vision": CODEC.placeholder_ids()["vision"]})
DATA = DataConfig(batch_size=16, seq_len=48, samples_per_row=2, mixture={"image": 1.0, "text": 1.0}, max_images=2)


def _objective(model, batch):
    """(cross entropy, gradients of the objective) over the microbatches, as the plain train step sums them."""
    gdef, params, rest = nnx.split(model, trainable_filter(model.config), ...)

    def total(p):
        mm = nnx.merge(gdef, p, rest)
        outs = [moe_model_loss(mm, jax.tree.map(lambda x, i=i: x[i], batch)) for i in range(M)]
        count = sum(o[1] for o in outs)
        return sum(o[0] + o[2] for o in outs) / count, sum(o[0] for o in outs) / count

    (_, ce), grads = jax.value_and_grad(total, has_aux=True)(params)
    return ce, grads


@pytest.fixture(scope="module")
def host():
    return SyntheticBatches(CFG, DATA, microbatches=M, codec=CODEC).batch_at(1)


@pytest.fixture(scope="module")
def one_device(host):
    model = MultimodalModel(CFG, rngs=nnx.Rngs(0))
    gdef, state = nnx.split(model)
    ce, grads = jax.jit(lambda st, b: _objective(nnx.merge(gdef, st), b))(state, jax.tree.map(jnp.asarray, host))
    return float(ce), nnx.to_pure_dict(grads)


def _flat(tree) -> dict:
    if isinstance(tree, nnx.State):
        tree = nnx.to_pure_dict(tree)
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _layout_run(pc: ParallelConfig, host):
    mesh = make_mesh(pc)
    model = create_model(CFG, mesh, pc, seed=0)  # same seed: the very weights of the one-device model
    batch = put_batch(host, mesh, leading=1, rule_table=rule_table(CFG, pc))
    with jax.set_mesh(mesh):
        if pc.pipeline > 1:
            from mllm_jax.train.pipelined_step import pipelined_loss_and_grad

            def run(m, b):
                s, c, g = pipelined_loss_and_grad(m, b, mesh=mesh, parallel_config=pc)
                return s / c, g
        else:
            run = _objective
        gdef, state = nnx.split(model)
        fn = jax.jit(lambda st, b: run(nnx.merge(gdef, st), b))
        hlo = fn.lower(state, batch).compile().as_text()
        ce, grads = fn(state, batch)
    return float(ce), grads, hlo


LAYOUTS = {
    "expert8": ParallelConfig(expert=8, microbatches=M),
    "expert4_data2": ParallelConfig(expert=4, data=2, microbatches=M),
    "expert2_fsdp2_tensor2": ParallelConfig(expert=2, fsdp=2, tensor=2, microbatches=M),
    "expert2_context2_data2": ParallelConfig(expert=2, context=2, data=2, microbatches=M),
    "expert2_pipeline2_data2": ParallelConfig(expert=2, pipeline=2, data=2, microbatches=M),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_expert_parallel_layout_equals_one_device(name, host, one_device):
    pc = LAYOUTS[name]
    ce1, grads1 = one_device
    ce, grads, hlo = _layout_run(pc, host)
    assert "all-to-all" in hlo  # the tokens really travel to their experts' devices
    np.testing.assert_allclose(ce, ce1, rtol=1e-5)
    got, want = _flat(grads), _flat(grads1)
    assert got.keys() == want.keys()
    router = [k for k in want if "router" in k]
    assert router and all(np.abs(want[k]).max() > 0 for k in router)  # the routers train (aux/z + the gates)
    for k in want:
        scale = max(1.0, float(np.abs(want[k]).max()))
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-5 * scale, err_msg=f"{name}: {k}")


def test_expert_axis_is_validated():
    from mllm_jax.layout import validate_layout
    import dataclasses

    with pytest.raises(ValueError, match=r"LLMConfig.n_experts=8 is not divisible by ParallelConfig.expert=3"):
        validate_layout(ParallelConfig(expert=3), CFG)
    mixed = CFG.replace(llm=dataclasses.replace(CFG.llm, moe_layer_freq=2))
    with pytest.raises(ValueError, match=r"pipeline=2 needs every LLM layer of one kind; LLMConfig has MoE layers"):
        validate_layout(ParallelConfig(pipeline=2), mixed)
