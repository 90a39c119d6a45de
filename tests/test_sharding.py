"""Mesh validation, per-module logical rules, sharded creation, and every layout == one device:

- the whole model (loss, gradients, hidden states) with encoder inputs arriving batch-sharded over (data, fsdp) on
  data2 x fsdp2 x tensor2, fsdp8, and data2 x fsdp4 with an audio rule whose batch leaves fsdp out;
- the encoders + projectors alone on the other layouts (data8, data2 x context4, fsdp4 x tensor2);
- the LLM under context parallelism (data2 x context4, a permuted batch): loss and gradients equal one device's, and
  each device computes 1/8 of the forward (compiled per-device FLOPs).

One model is built once (one device); every layout runs its weights (model_testlib.place), one compile per layout.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mllm_jax.kernels.meta import TokenMeta
from mllm_jax import MultimodalModel
from mllm_jax import partitioning as part
from mllm_jax.build import abstract_model
from mllm_jax.config import ModelConfig
from mllm_jax.parallel.config import ContextConfig, ParallelConfig
from mllm_jax.layout import validate_layout
from mllm_jax.parallel.context import permute_batch, plan, unpermute
from mllm_jax.parallel.mesh import make_mesh
from mllm_jax.parallel.sharding import logical_rules, rule_table

from model_testlib import TINY_LLM, build, instances_batch, place, tiny_config

LAYOUT = ParallelConfig(data=2, fsdp=2, tensor=2)
CFG = tiny_config()


def test_mesh_validation_names_the_numbers():
    with pytest.raises(ValueError, match=r"data=3 .* = 3 devices, but 8 are available"):
        make_mesh(ParallelConfig(data=3))
    with pytest.raises(ValueError, match=r"LLMConfig.n_kv_heads=2 is not divisible by ParallelConfig.tensor=4"):
        validate_layout(ParallelConfig(data=2, tensor=4), CFG)
    mesh = make_mesh(LAYOUT)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "expert": 1, "pipeline": 1, "context": 1, "tensor": 2}


def test_layout_is_checked_against_every_module():
    odd_vision = dataclasses.replace(CFG.encoders["vision"], n_heads=3)
    with pytest.raises(ValueError, match=r"encoders\['vision'\].n_heads=3 is not divisible by ParallelConfig.tensor=2"):
        validate_layout(ParallelConfig(data=4, tensor=2), tiny_config(encoders={**CFG.encoders, "vision": odd_vision}))
    with pytest.raises(ValueError, match=r"LLMConfig.n_layers=2 is fewer than ParallelConfig.pipeline=4"):
        validate_layout(ParallelConfig(data=2, pipeline=4), CFG)
    # Ring context attention inside pipeline stages is a valid layout (tests/test_context_pipeline.py runs it).
    validate_layout(ParallelConfig(pipeline=2, context=2, context_config=ContextConfig(attention="ring")), CFG)
    with pytest.raises(ValueError, match=r"= 4 devices, but 8 are available"):
        validate_layout(ParallelConfig(data=4), CFG, num_devices=8)
    validate_layout(LAYOUT, CFG, num_devices=8)
    # Virtual-stage schedules: a chunk of layers per stage and chunk; interleaved takes microbatches by S.
    with pytest.raises(ValueError, match=r"'zb_v' runs 2 chunks .*n_layers=2 is fewer than .*pipeline=2 x 2"):
        validate_layout(ParallelConfig(pipeline=2, pipeline_schedule="zb_v"), CFG)
    deep = tiny_config(llm=dataclasses.replace(CFG.llm, n_layers=8))
    with pytest.raises(ValueError, match=r"groups of ParallelConfig.pipeline=2: ParallelConfig.microbatches=3"):
        validate_layout(ParallelConfig(pipeline=2, microbatches=3, pipeline_schedule="interleaved"), deep)
    validate_layout(ParallelConfig(pipeline=2, microbatches=4, pipeline_schedule="interleaved"), deep)
    with pytest.raises(ValueError, match=r"pipeline_schedule must be 'auto' or one of .* got 'zigzag'"):
        ParallelConfig(pipeline_schedule="zigzag")


def test_rules_per_module_and_overrides():
    llm = dict(logical_rules("llm", LAYOUT))
    enc = dict(logical_rules("encoders/vision", LAYOUT))
    assert llm["batch"] == ("data", "fsdp", "expert") and llm["mlp"] == "tensor" and llm["length"] == "context"
    assert llm["experts"] == "expert" and llm["expert_mlp"] == "tensor" and llm["moe_router"] is None
    assert set(enc["batch"]) == {"data", "fsdp", "expert", "pipeline", "context", "tensor"} and enc["mlp"] is None
    assert enc["length"] is None  # an image's or clip's tokens stay together: the encoders shard their batch only
    over = ParallelConfig(data=8, rules={"llm": {"mlp": None, "length": None}})
    table = dict(rule_table(CFG, over))
    assert dict(table["llm"])["mlp"] is None and dict(table["llm"])["length"] is None
    assert set(table) == {"llm", "encoders/audio", "encoders/vision", "projectors/audio", "projectors/vision"}
    with pytest.raises(ValueError, match="'bogus'"):
        logical_rules("llm", ParallelConfig(rules={"llm": {"mlp": "bogus"}}))
    with pytest.raises(ValueError, match="encoders/nope"):
        rule_table(CFG, ParallelConfig(rules={"encoders/nope": {}}))


def test_encoder_batch_spreads_over_axes_that_divide_it():
    mesh = make_mesh(LAYOUT)
    rules = logical_rules("encoders/vision", LAYOUT)
    with jax.set_mesh(mesh), part.rules_scope(rules):
        assert part.spec(("batch", "length"), (8, 3)) == P(("data", "fsdp", "tensor"), None)
        assert part.spec(("batch", "length"), (4, 3)) == P(("data", "fsdp"), None)
        assert part.spec(("batch", "length"), (3, 3)) == P(None, None)


def test_created_parameters_are_sharded_by_their_module_rules():
    model = abstract_model(CFG, make_mesh(LAYOUT), LAYOUT)
    st = nnx.state(model)
    spec = lambda v: v.get_value().sharding.spec  # noqa: E731
    assert spec(st["llm"]["layers"]["attn"]["q"]["kernel"]) == P(None, "fsdp", "tensor", None)
    assert spec(st["llm"]["embed"]["embedding"]) == P("tensor", "fsdp")
    assert spec(st["llm"]["layers"]["mlp"]["down"]["kernel"]) == P(None, "tensor", "fsdp")
    assert spec(st["encoders"]["vision"]["layers"]["mlp"]["fc1"]["kernel"]) == P(None, "fsdp", None)


# ---------------------------------------------------------------------------------------------------------------
# Every layout == one device


@pytest.fixture(scope="module")
def model():
    return build(MultimodalModel, CFG, 0)


@pytest.fixture(scope="module")
def batch():
    return instances_batch(CFG, rows=8, per_row=1, length=16)  # 8 rows, 8 images, 8 clips, each used once


def _split_params(graphdef, state):
    """(merge(params) -> model, params): differentiate the Params, keep the rest closed over."""
    gdef, params, rest = nnx.split(nnx.merge(graphdef, state), nnx.Param, ...)
    return (lambda p: nnx.merge(gdef, p, rest)), params


def _model_run(graphdef, state):
    """jitted batch -> (loss, hidden, grads): one compile per layout."""
    merge, params = _split_params(graphdef, state)

    @jax.jit
    def run(params, batch):
        def loss(p):
            m = merge(p)
            hidden = m(batch)
            total, count = m.loss_from_hidden(hidden, batch)
            return total / count, hidden

        (value, hidden), grads = jax.value_and_grad(loss, has_aux=True)(params)
        return value, hidden, grads

    return lambda batch: run(params, batch)


def _flat(grads) -> dict:
    if isinstance(grads, nnx.State):
        grads = nnx.to_pure_dict(grads)
    return {path: np.asarray(v) for path, v in jax.tree_util.tree_flatten_with_path(grads)[0]}


def _assert_grads_equal(got, want, tol):
    got, want = _flat(got), _flat(want)
    assert got.keys() == want.keys()
    for path in want:
        # float32 sums in another order (one device: one 2-d matmul; sharded: per-shard einsums + a reduction) differ
        # by ~tol times the summands, not the result: entries that cancel to near zero get atol on the array's scale.
        scale = max(1.0, float(np.max(np.abs(want[path]))))
        np.testing.assert_allclose(got[path], want[path], rtol=tol, atol=tol * scale,
                                   err_msg=jax.tree_util.keystr(path))


def _on_mesh(pc: ParallelConfig, value, axes: tuple, mesh):
    """``value`` (numpy) placed on ``mesh`` sharded over ``axes`` on its leading dimension (size-1 axes left out)."""
    axes = tuple(a for a in axes if mesh.shape[a] > 1)
    spec = P(axes if len(axes) > 1 else axes[0] if axes else None)
    return jax.device_put(jnp.asarray(value), NamedSharding(mesh, spec))


@pytest.fixture(scope="module")
def one_device_model_run(model, batch):
    return _model_run(*nnx.split(model))(jax.tree.map(jnp.asarray, batch))


AUDIO_WITHOUT_FSDP = ParallelConfig(data=2, fsdp=4, rules={"encoders/audio": {"batch": ("data",)}})


# 1e-5: the layouts differ from one device only in the order of float32 sums (FSDP / tensor partial sums, the
# encoder batch split); every value here is O(1) with ~1e-7 rounding per op over a few dozen ops.
@pytest.mark.slow
@pytest.mark.parametrize("pc", [LAYOUT, ParallelConfig(fsdp=8), AUDIO_WITHOUT_FSDP],
                         ids=["data2_fsdp2_tensor2", "fsdp8", "audio_batch_without_fsdp"])
def test_model_with_batch_sharded_encoder_inputs_equals_one_device(model, batch, one_device_model_run, pc):
    loss1, hidden1, grads1 = one_device_model_run
    mesh = make_mesh(pc)
    run = _model_run(*place(model, abstract_model(CFG, mesh, pc), mesh))
    with jax.set_mesh(mesh):
        # encoder inputs arrive sharded over the LLM batch's axes (data, fsdp), not replicated: the encoders take
        # them as they are and spread them further over their own rule's batch axes
        b = {k: v for k, v in batch.items() if k != "encoder_inputs"}
        b = jax.tree.map(lambda v: _on_mesh(pc, v, ("data", "fsdp"), mesh), b)
        b["encoder_inputs"] = {k: _on_mesh(pc, v, ("data", "fsdp"), mesh) for k, v in batch["encoder_inputs"].items()}
        loss, hidden, grads = run(b)
    np.testing.assert_allclose(float(loss), float(loss1), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(hidden), np.asarray(hidden1), rtol=1e-5, atol=1e-5)
    _assert_grads_equal(grads, grads1, 1e-5)


def _encoders_run(graphdef, state, weights):
    """jitted encoder inputs -> (features per modality, grads of sum(features * weights) w.r.t. every Param)."""
    merge, params = _split_params(graphdef, state)

    @jax.jit
    def run(params, inputs):
        def f(p):
            m = merge(p)
            feats = {name: m.encode(name, x) for name, x in inputs.items()}
            return sum(jnp.sum(feats[n] * weights[n]) for n in feats), feats

        (_, feats), grads = jax.value_and_grad(f, has_aux=True)(params)
        enc = {k: v for k, v in nnx.to_pure_dict(grads).items() if k in ("encoders", "projectors")}
        return feats, enc

    return lambda inputs: run(params, inputs)


FEATURE_SHAPES = {"vision": (8, 4, 32), "audio": (8, 2, 32)}  # [N, projected tokens, LLM d_model]
FEATURE_WEIGHTS = {n: np.random.default_rng(1).normal(size=s).astype(np.float32) for n, s in FEATURE_SHAPES.items()}


@pytest.fixture(scope="module")
def one_device_encoders_run(model, batch):
    return _encoders_run(*nnx.split(model), FEATURE_WEIGHTS)(batch["encoder_inputs"])


@pytest.mark.slow
@pytest.mark.parametrize("pc", [ParallelConfig(data=8), ParallelConfig(data=2, context=4),
                                ParallelConfig(fsdp=4, tensor=2)], ids=["data8", "data2_context4", "fsdp4_tensor2"])
def test_encoders_with_batch_sharded_inputs_equal_one_device(model, batch, one_device_encoders_run, pc):
    inputs = batch["encoder_inputs"]
    feats1, grads1 = one_device_encoders_run
    mesh = make_mesh(pc)
    run = _encoders_run(*place(model, abstract_model(CFG, mesh, pc), mesh), FEATURE_WEIGHTS)
    with jax.set_mesh(mesh):
        feats, grads = run({k: _on_mesh(pc, v, ("data", "fsdp", "context"), mesh) for k, v in inputs.items()})
    for name in inputs:
        assert feats[name].shape == FEATURE_SHAPES[name]
        # each device holds 1/8 of the features: the encoders' batch is spread over all 8 devices
        assert feats[name].sharding.shard_shape(feats[name].shape)[0] == 1, feats[name].sharding
        np.testing.assert_allclose(np.asarray(feats[name]), np.asarray(feats1[name]), rtol=1e-5, atol=1e-5)
    _assert_grads_equal(grads, grads1, 1e-5)


# ---------------------------------------------------------------------------------------------------------------
# The LLM under context parallelism

CP = ParallelConfig(data=2, context=4, context_config=ContextConfig(mode="balanced", block=16))
TEXT_CFG = ModelConfig(llm=TINY_LLM)


def _packed_text_batch(rows=2, length=128, seed=0):
    """Rows of packed samples (each with an 8-token bidirectional span) and a padded tail; labels shifted before
    any permutation."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, TINY_LLM.vocab_size, (rows, length)).astype(np.int32)
    pos, seg, span = (np.zeros((rows, length), np.int32) for _ in range(3))
    for r in range(rows):
        t, s = 0, 1
        for n in (40, 56, 24):
            pos[r, t:t + n], seg[r, t:t + n] = np.arange(n), s
            span[r, t + 5:t + 13] = s
            t, s = t + n, s + 1
    labels = np.concatenate([ids[:, 1:], np.full((rows, 1), -100, np.int32)], axis=1)
    labels = np.where((seg != 0) & (np.roll(seg, -1, axis=1) == seg), labels, -100).astype(np.int32)
    return dict(input_ids=ids, labels=labels, positions=pos, segment_ids=seg, span_ids=span)


def _llm_tokens_on_mesh(batch, mesh):
    """Token arrays laid out as the LLM's rules say: batch over (data, fsdp), sequence over context."""
    return {k: jax.device_put(jnp.asarray(v), NamedSharding(mesh, P("data", "context"))) for k, v in batch.items()}


@pytest.mark.slow
def test_llm_context_parallel_computes_a_shard_and_equals_one_device():
    text_model = build(MultimodalModel, TEXT_CFG, 0)
    batch = _packed_text_batch()
    meta = TokenMeta(batch["positions"], batch["segment_ids"], batch["span_ids"])
    p = plan(meta, CP.context, CP.context_config.mode, block=CP.context_config.block, tile_k=8)
    permuted = permute_batch(batch, p)
    assert permuted["input_ids"].shape == batch["input_ids"].shape  # 128 = 4 ranks x 2 blocks of 16: no padding
    assert not np.array_equal(permuted["positions"], batch["positions"])  # the plan does move blocks

    def forward_flops(graphdef, state, tokens):
        compiled = jax.jit(lambda st, b: nnx.merge(graphdef, st)(b)).lower(state, tokens).compile()
        return compiled.cost_analysis()["flops"]

    gdef1, state1 = nnx.split(text_model)
    mesh = make_mesh(CP)
    gdef8, state8 = place(text_model, abstract_model(TEXT_CFG, mesh, CP), mesh)
    flops1 = forward_flops(gdef1, state1, batch)
    with jax.set_mesh(mesh):
        tokens = _llm_tokens_on_mesh(permuted, mesh)
        flops8 = forward_flops(gdef8, state8, tokens)
        loss8, hidden8, grads8 = _model_run(gdef8, state8)(tokens)
    loss1, hidden1, grads1 = _model_run(gdef1, state1)(jax.tree.map(jnp.asarray, batch))

    # The hidden states stay sharded over (data, context): every rank keeps only its own tokens.
    assert hidden8.sharding.spec == P("data", "context", None), hidden8.sharding
    np.testing.assert_allclose(unpermute(np.asarray(hidden8), p), np.asarray(hidden1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(loss8), float(loss1), rtol=1e-5)
    _assert_grads_equal(grads8, grads1, 1e-5)
    # Per device 1/8 of the forward: projections, MLP, norms and RoPE on the S/4 tokens of 1 row of 2; attention of
    # those S/4 queries against the row's gathered S keys (dense [S/4, S] scores). What does not split (per-layer
    # parameter casts, the shard_map's metadata handling) measures 1.07/8 here, so the band is [0.95, 1.25] x 1/8.
    # With the old rule ("length" not sharded over context, activations replicated over context, only attention
    # split) a device computes 2.4/8 of this forward (2.81M of 9.29M FLOPs): far outside the band.
    assert 0.95 / 8 <= flops8 / flops1 <= 1.25 / 8, (flops8, flops1)


def test_given_stage_layers_are_checked_against_the_layout():
    """ParallelConfig.pipeline_stage_layers: one entry per (virtual) stage, each >= 1, summing to the LLM's layers;
    refused naming the value before anything is built."""
    n = 8
    cfg = dataclasses.replace(CFG, llm=dataclasses.replace(CFG.llm, n_layers=n))
    ok = ParallelConfig(data=4, pipeline=2, pipeline_stage_layers=[n - 1, 1])
    assert ok.pipeline_stage_layers == (n - 1, 1)
    validate_layout(ok, cfg)
    validate_layout(ParallelConfig(data=4, pipeline=2, pipeline_schedule="zb_v", pipeline_stage_layers=(3, 2, 2, 1)),
                    cfg)
    for bad in ((0, n), "4,4", (1.5, 2), True):
        with pytest.raises(ValueError, match=r"pipeline_stage_layers must be None or a tuple"):
            ParallelConfig(pipeline=2, pipeline_stage_layers=bad)
    cases = [
        (dict(pipeline=2, pipeline_stage_layers=(n, 1)), rf"must have 2 entries .* summing to LLMConfig.n_layers={n}"),
        (dict(pipeline=2, pipeline_stage_layers=(1,) * n), r"must have 2 entries \(one per pipeline stage\)"),
        (dict(pipeline=2, pipeline_schedule="zb_v", pipeline_stage_layers=(n - 1, 1)), r"must have 4 entries .*zb_v"),
        (dict(pipeline=2, pipeline_schedule="auto", pipeline_stage_layers=(n - 1, 1)), r"schedule is 'auto'"),
        (dict(pipeline_stage_layers=(n,)), r"is set but ParallelConfig.pipeline is 1"),
    ]
    for kw, match in cases:
        with pytest.raises(ValueError, match=match):
            validate_layout(ParallelConfig(**kw), cfg)
