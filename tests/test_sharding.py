"""Mesh validation, per-module logical rules, sharded creation, and one device == (data=2, fsdp=2, tensor=2)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from mllm_jax import MultimodalModel
from mllm_jax import partitioning as part
from mllm_jax.build import abstract_model, create_model
from parallel.config import ParallelConfig
from parallel.mesh import make_mesh, validate_model
from parallel.sharding import logical_rules, rule_table

from model_testlib import TINY_LLM, build, tiny_batch, tiny_config

LAYOUT = ParallelConfig(data=2, fsdp=2, tensor=2)


def test_mesh_validation_names_the_numbers():
    with pytest.raises(ValueError, match=r"data=3 .* = 3 devices, but 8 devices"):
        make_mesh(ParallelConfig(data=3))
    with pytest.raises(ValueError, match=r"n_kv_heads \(2\) must be divisible by the tensor axis size \(4\)"):
        validate_model(ParallelConfig(data=2, tensor=4), tiny_config())
    mesh = make_mesh(LAYOUT)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "pipeline": 1, "context": 1, "tensor": 2}


def test_rules_per_module_and_overrides():
    llm = dict(logical_rules("llm", LAYOUT))
    enc = dict(logical_rules("encoders/vision", LAYOUT))
    assert llm["batch"] == ("data", "fsdp") and llm["mlp"] == "tensor"
    assert set(enc["batch"]) == {"data", "fsdp", "pipeline", "context", "tensor"} and enc["mlp"] is None
    over = ParallelConfig(data=8, rules={"llm": {"mlp": None, "length": "context"}})
    table = dict(rule_table(tiny_config(), over))
    assert dict(table["llm"])["mlp"] is None and dict(table["llm"])["length"] == "context"
    assert set(table) == {"llm", "encoders/audio", "encoders/vision", "projectors/audio", "projectors/vision"}
    with pytest.raises(ValueError, match="'bogus'"):
        logical_rules("llm", ParallelConfig(rules={"llm": {"mlp": "bogus"}}))
    with pytest.raises(ValueError, match="encoders/nope"):
        rule_table(tiny_config(), ParallelConfig(rules={"encoders/nope": {}}))


def test_encoder_batch_spreads_over_axes_that_divide_it():
    mesh = make_mesh(LAYOUT)
    rules = logical_rules("encoders/vision", LAYOUT)
    with jax.set_mesh(mesh), part.rules_scope(rules):
        assert part.spec(("batch", "length"), (8, 3)) == P(("data", "fsdp", "tensor"), None)
        assert part.spec(("batch", "length"), (4, 3)) == P(("data", "fsdp"), None)
        assert part.spec(("batch", "length"), (3, 3)) == P(None, None)


def test_created_parameters_are_sharded_by_their_module_rules():
    model = abstract_model(tiny_config(), make_mesh(LAYOUT), LAYOUT)
    st = nnx.state(model)
    spec = lambda v: v.get_value().sharding.spec  # noqa: E731
    assert spec(st["llm"]["layers"]["attn"]["q"]["kernel"]) == P(None, "fsdp", "tensor", None)
    assert spec(st["llm"]["embed"]["embedding"]) == P("tensor", "fsdp")
    assert spec(st["llm"]["layers"]["mlp"]["down"]["kernel"]) == P(None, "tensor", "fsdp")
    assert spec(st["encoders"]["vision"]["layers"]["mlp"]["fc1"]["kernel"]) == P(None, "fsdp", None)


@pytest.mark.slow
def test_one_device_equals_data_fsdp_tensor_mesh():
    cfg = tiny_config()
    batch = jax.tree.map(jnp.asarray, tiny_batch(cfg))

    def loss_and_grads(m, b):
        def f(m):
            s, c = m.loss(b)
            return s / c

        return nnx.value_and_grad(f)(m)

    single = build(MultimodalModel, cfg, 0)
    l1, g1 = nnx.jit(loss_and_grads)(single, batch)
    mesh = make_mesh(LAYOUT)
    sharded = create_model(cfg, mesh, LAYOUT, 0)
    with jax.set_mesh(mesh):
        h = nnx.jit(lambda m, b: m(b))(sharded, batch)
        l8, g8 = nnx.jit(loss_and_grads)(sharded, batch)
    assert nnx.state(sharded)["llm"]["layers"]["attn"]["q"]["kernel"][...].sharding.spec == P(None, "fsdp", "tensor",
                                                                                                None)
    np.testing.assert_allclose(h, nnx.jit(lambda m, b: m(b))(single, batch), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(l8, l1, rtol=1e-5)
    flat1 = dict(nnx.to_flat_state(g1))
    for path, g in nnx.to_flat_state(g8):
        np.testing.assert_allclose(np.asarray(g[...]), np.asarray(flat1[path][...]), rtol=1e-5, atol=1e-5,
                                   err_msg=str(path))
