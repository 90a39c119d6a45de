"""The pipelined MultimodalModel (train.pipelined_step) against one device's model.loss: loss and every trainable
gradient, over stage splits, microbatch counts, frozen parts and data / tensor axes."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from mllm_jax.build import create_model
from mllm_jax.config import LLMConfig, LoRAConfig, ModelConfig, ProjectorConfig, VisionConfig
from mllm_jax.freeze import trainable_filter
from mllm_jax.layers import LoRAParam
from mllm_jax.multimodal import MultimodalModel
from mllm_jax.parallel.config import ParallelConfig
from mllm_jax.parallel.mesh import make_mesh
from mllm_jax.parallel.schedule import build_schedule, default_slicing
from mllm_jax.train import pipelined_step
from mllm_jax.train.pipelined_step import (_embed_outside, flatten_microbatches, microbatch_rows,
                                           pipelined_loss_and_grad)

PLACEHOLDER = 3
IMAGE, PATCH = 8, 4
FEATS = (IMAGE // PATCH) ** 2  # tokens per image
SEQ = 16


def tiny_config(n_layers=4, trainable=None, lora=None, **llm_kw):
    llm = LLMConfig(vocab_size=64, d_model=32, n_layers=n_layers, n_heads=4, n_kv_heads=2, d_ff=64, **llm_kw)
    vision = VisionConfig(kind="vit", image_size=IMAGE, patch_size=PATCH, d_model=16, n_layers=1, n_heads=2,
                          d_ff=32, class_token=False)
    return ModelConfig(llm=llm, encoders={"vision": vision}, projectors={"vision": ProjectorConfig(kind="mlp")},
                       placeholder_ids={"vision": PLACEHOLDER}, trainable=dict(trainable or {}), lora=lora)


def make_batch(M, mb, seed=0):
    """Microbatched contract batch: per row one image (a span of FEATS placeholders) inside text, two packed
    samples in some rows, padding at the end, labels with ignored positions."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(4, 64, (M, mb, SEQ)).astype(np.int32)
    labels = rng.integers(0, 64, (M, mb, SEQ)).astype(np.int32)
    pos = np.zeros((M, mb, SEQ), np.int32)
    seg = np.zeros((M, mb, SEQ), np.int32)
    span = np.zeros((M, mb, SEQ), np.int32)
    fi = np.full((M, mb, SEQ), -1, np.int32)
    for m in range(M):
        for b in range(mb):
            start = 2 + (m + b) % 3
            ids[m, b, start:start + FEATS] = PLACEHOLDER
            span[m, b, start:start + FEATS] = 1
            fi[m, b, start:start + FEATS] = b * FEATS + np.arange(FEATS)
            labels[m, b, : start + FEATS] = -100
            used = SEQ - (m + b) % 3  # padding tail
            cut = 11 if b % 2 else used  # a second packed sample in odd rows
            seg[m, b, :cut] = 1
            seg[m, b, cut:used] = 2
            pos[m, b, :cut] = np.arange(cut)
            pos[m, b, cut:used] = np.arange(used - cut)
            labels[m, b, used:] = -100
            ids[m, b, used:] = 0
    pixels = rng.normal(size=(M, mb, IMAGE, IMAGE, 3)).astype(np.float32)
    return {"input_ids": ids, "labels": labels, "positions": pos, "segment_ids": seg, "span_ids": span,
            "encoder_inputs": {"vision": pixels}, "feature_index": {"vision": fi}}


def concatenated(batch):
    """The microbatches as one batch (rows and images concatenated, feature indices offset): the plain model's loss
    sum over it is the sum over the microbatches."""
    M, mb = batch["input_ids"].shape[:2]
    out = {k: np.asarray(v).reshape((M * mb,) + np.shape(v)[2:]) for k, v in batch.items() if not isinstance(v, dict)}
    pixels = np.asarray(batch["encoder_inputs"]["vision"])
    out["encoder_inputs"] = {"vision": pixels.reshape((-1,) + pixels.shape[2:])}
    fi = np.asarray(batch["feature_index"]["vision"])
    offset = (np.arange(M) * pixels.shape[1] * FEATS)[:, None, None]
    out["feature_index"] = {"vision": np.where(fi >= 0, fi + offset, -1).reshape(M * mb, SEQ)}
    return out


def one_device(model, batch):
    """Oracle: nnx.value_and_grad of model.loss sum / count on one device (plain jit, no mesh)."""
    config = model.config

    def loss(m):
        s, c = m.loss(concatenated(batch))
        return s / c.astype(jnp.float32)

    return nnx.jit(nnx.value_and_grad(loss, argnums=nnx.DiffState(0, trainable_filter(config))))(model)


def jitted_pipeline(model, mesh, parallel, stage_layers):
    """(jit of pipelined_loss_and_grad over the model's state, that state)."""
    gdef, state = nnx.split(model)

    @jax.jit
    def run(st, batch):
        return pipelined_loss_and_grad(nnx.merge(gdef, st), batch, mesh=mesh, parallel_config=parallel,
                                       stage_layers=stage_layers)

    return run, state


def check(config, parallel, stage_layers, *, mb=2, sharded_model=False, perturb_lora=False) -> str:
    """Pipelined loss and gradients vs one device. ``sharded_model``: the pipelined model is build.create_model's
    (per-module rules, parameters sharded on the mesh); else the one-device model's parameters replicated on it.
    Returns the compiled pipelined program's HLO text (the program that computed the checked gradients)."""
    mesh = make_mesh(parallel, jax.devices()[: parallel.num_devices])
    if sharded_model:
        model = create_model(config, mesh, parallel, seed=0)
        reference = MultimodalModel(config, rngs=nnx.Rngs(0))
        nnx.update(reference, jax.device_get(nnx.state(model)))
    else:
        reference = MultimodalModel(config, rngs=nnx.Rngs(0))
        model = reference
    if perturb_lora:
        for m in {id(reference): reference, id(model): model}.values():  # the same values into both
            for i, (path, v) in enumerate(nnx.to_flat_state(nnx.state(m, LoRAParam))):
                if path[-1] == "lora_b":
                    value = 0.1 * jax.random.normal(jax.random.key(i), v.shape)
                    v.set_value(jax.device_put(value, v[...].sharding) if m is not reference else value)
    batch = make_batch(parallel.microbatches, mb)
    want_loss, want = one_device(reference, batch)
    run, st = jitted_pipeline(model, mesh, parallel, stage_layers)
    with jax.set_mesh(mesh):
        if not sharded_model:
            st = jax.device_put(st, NamedSharding(mesh, P()))
        if parallel.data > 1:  # the microbatch rows over `data` (images replicated: the encoder spreads them)
            rows = NamedSharding(mesh, P(None, "data"))
            batch = {k: v if isinstance(v, dict) or k == "encoder_inputs" else jax.device_put(v, rows)
                     for k, v in batch.items()}
            batch["feature_index"] = jax.tree.map(lambda a: jax.device_put(a, rows), batch["feature_index"])
        compiled = run.lower(st, batch).compile()
        loss_sum, count, grads = compiled(st, batch)
    np.testing.assert_allclose(loss_sum / count, want_loss, rtol=2e-5)
    want_flat = dict(nnx.to_flat_state(want))
    got_flat = dict(nnx.to_flat_state(grads))
    assert sorted(got_flat) == sorted(want_flat)
    for path, w in want_flat.items():
        w, g = np.asarray(w[...]), np.asarray(got_flat[path][...])
        assert np.abs(w).max() > 0, f"{path}: the oracle gradient is zero (the test would not see a bug)"
        np.testing.assert_allclose(g, w, rtol=2e-4, atol=2e-6, err_msg="/".join(map(str, path)))
    return compiled.as_text()


def all_gathers(hlo: str) -> list:
    """(in a loop, element type, result shape) of every all-gather in compiled HLO text. In a loop: in a computation
    reachable from a ``while`` body (the pipeline's tick scan and the loops inside it) through the computations
    that instructions call (fusions, conditional branches, nested loops)."""
    calls, bodies, found, comp = {}, [], [], None
    for line in hlo.splitlines():
        head = re.match(r"(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if head and not line.startswith(" "):
            comp = head.group(1)
            calls[comp] = set()
            continue
        if comp is None:
            continue
        calls[comp].update(re.findall(r"(?:body|condition|calls|to_apply)=%?([\w.\-]+)", line))
        for group in re.findall(r"branch_computations=\{([^}]*)\}", line):
            calls[comp].update(c.strip().lstrip("%") for c in group.split(","))
        bodies += re.findall(r" while\(.*body=%?([\w.\-]+)", line)
        gather = re.search(r"= (\w+)\[([\d,]*)\]\S* all-gather(?:-start)?\(", line)
        if gather:
            found.append((comp, gather.group(1), tuple(int(d) for d in gather.group(2).split(",") if d)))
    in_loop, todo = set(), list(bodies)
    while todo:
        c = todo.pop()
        if c not in in_loop:
            in_loop.add(c)
            todo.extend(calls.get(c, ()))
    return [(c in in_loop, dtype, shape) for c, dtype, shape in found]


def fsdp_layer_leaves(config, parallel) -> int:
    """Leaves of one decoder layer that build.create_model stores sharded over `fsdp` (what an FSDP gather moves)."""
    mesh = make_mesh(parallel, jax.devices()[: parallel.num_devices])
    model = create_model(config, mesh, parallel, seed=0)
    values, _ = model.llm.layer_params()
    return sum("fsdp" in str(a.sharding.spec) for a in jax.tree.leaves(values))


FROZEN_ENC = {"encoders/vision": False}
FROZEN_ENC_PROJ = {"encoders/vision": False, "projectors/vision": False}
FROZEN_LLM = {"encoders/vision": False, "llm": False}  # only the projector trains


def test_flatten_microbatches_points_at_the_same_features():
    batch = make_batch(3, 2)
    flat = flatten_microbatches(batch, {"vision": FEATS})
    feats = np.asarray(batch["encoder_inputs"]["vision"]).reshape(3, 2, -1)  # a stand-in feature per instance
    flat_feats = np.repeat(np.asarray(flat["encoder_inputs"]["vision"]).reshape(6, -1), FEATS, axis=0)
    for m in range(3):
        for b in range(2):
            row = b * 3 + m
            fi, ffi = batch["feature_index"]["vision"][m, b], np.asarray(flat["feature_index"]["vision"][row])
            assert ((fi >= 0) == (ffi >= 0)).all()
            np.testing.assert_array_equal(flat_feats[ffi[ffi >= 0]], feats[m, fi[fi >= 0] // FEATS])
            np.testing.assert_array_equal(flat["input_ids"][row], batch["input_ids"][m, b])


@pytest.mark.parametrize("parallel,M,mb", [
    (ParallelConfig(data=2, pipeline=2, tensor=2, microbatches=3), 3, 2),  # M off a multiple of P: a padded slot
    (ParallelConfig(fsdp=2, pipeline=4, microbatches=8), 8, 4),           # K = 2 slots per device, 2 rows per shard
])
def test_pipeline_inputs_are_made_on_the_devices_that_hold_them(parallel, M, mb):
    # The embedding and the injection run on rows laid out over (pipeline, the LLM's batch axes): the pipeline's
    # input [P K, mb, S, D] comes out with its microbatches over `pipeline` (device p holds microbatches p K .. p K +
    # K - 1, the conveyor's slots) and its rows over the batch axes, equal to one device's embedding of each
    # microbatch (zeros past M are not checked: no op reads them). Before, every pipeline device made all M.
    cfg = tiny_config(4, FROZEN_ENC)
    mesh = make_mesh(parallel, jax.devices()[: parallel.num_devices])
    model = create_model(cfg, mesh, parallel, seed=0)
    reference = MultimodalModel(cfg, rngs=nnx.Rngs(0))
    nnx.update(reference, jax.device_get(nnx.state(model)))
    batch = make_batch(M, mb)
    gdef, state = nnx.split(model)

    @jax.jit
    def inputs(st, b):
        m = nnx.merge(gdef, st)
        out = _embed_outside(m, b, microbatch_rows(m, mesh, M, mb, SEQ))
        return out.x_M, out.emb

    with jax.set_mesh(mesh):
        x, emb = inputs(state, batch)
    batch_axis = "data" if parallel.data > 1 else "fsdp"
    assert x.sharding.spec[:2] == ("pipeline", batch_axis), x.sharding.spec
    assert emb.sharding.spec[0] == ("pipeline", batch_axis), emb.sharding.spec
    K = max(2, -(-M // parallel.pipeline))
    assert x.shape[0] == parallel.pipeline * K
    want = np.asarray(reference.embed(concatenated(batch))).reshape(M, mb, SEQ, -1)
    np.testing.assert_allclose(np.asarray(x)[:M], want, rtol=1e-6, atol=1e-6)


WINDOWS = dict(sliding_window=3, sliding_window_pattern=2)  # Gemma 2 style alternating local / global layers


@pytest.mark.slow
@pytest.mark.parametrize("stages,split,M,trainable,llm_kw", [
    (2, (4, 2), 2, {}, {}),                          # everything trains
    (2, None, 1, FROZEN_ENC, WINDOWS),               # planned split, one microbatch, windows follow the layers
    (4, (2, 1, 2, 1), 4, FROZEN_LLM, {}),            # frozen LLM, trainable projector: dX through every layer
    (4, (1, 1, 3, 1), 2, FROZEN_ENC_PROJ, {}),       # nothing upstream of the LLM trains
])
def test_pipelined_model_matches_one_device(stages, split, M, trainable, llm_kw):
    check(tiny_config(6, trainable, **llm_kw), ParallelConfig(pipeline=stages, microbatches=M), split)


@pytest.mark.slow
def test_pipelined_model_with_llm_lora():
    # LoRA on the LLM: only the adapters (and the projector) train; base weights, head and embedding stay frozen.
    # lora_b starts at zero, so perturb it: with lora_b = 0 the adapters' A gradient would be zero. Stored over
    # fsdp and gathered once per step (pipeline_fsdp_gather_once): the frozen base weights and the adapters are
    # gathered alike, the adapters' gradients (against the gathered copy) reduce-scattered into their storage layout.
    lora = LoRAConfig(rank=2, alpha=4.0, targets=("q", "v", "down"), modules=("llm",))
    cfg = tiny_config(6, FROZEN_ENC, lora=lora)
    parallel = ParallelConfig(fsdp=2, pipeline=2, microbatches=2, pipeline_fsdp_gather_once=True)
    gathers = all_gathers(check(cfg, parallel, (2, 4), perturb_lora=True, sharded_model=True))
    assert not [g for g in gathers if g[0]], "an all-gather inside the tick loop"


@pytest.mark.slow
def test_pipelined_model_zb_h1_with_llm_lora():
    # ZB-H1 (split B / W, W filling the cool-down) on the real decoder layers: the adapters' W only, base weights
    # frozen (no dW computed for them), against one device.
    lora = LoRAConfig(rank=2, alpha=4.0, targets=("q", "v", "down"), modules=("llm",))
    cfg = tiny_config(4, FROZEN_ENC, lora=lora)
    check(cfg, ParallelConfig(pipeline=2, microbatches=3, pipeline_schedule="zb_h1"), (3, 1), perturb_lora=True)


@pytest.mark.slow
@pytest.mark.parametrize("schedule,parallel,split,trainable", [
    # The V on the real decoder layers: LoRA adapters' W deferred into the cool-down, stored over fsdp; the split of
    # the 4 virtual stages planned (the planner's virtual_split).
    ("zb_v", dict(fsdp=2, pipeline=2, microbatches=3), None, "lora"),
    # Megatron's ring of chunks: a frozen LLM under a trainable projector (dX through every chunk, across the wrap).
    ("interleaved", dict(pipeline=2, microbatches=2), (1, 2, 2, 1), FROZEN_LLM),
])
def test_pipelined_model_with_virtual_stages(schedule, parallel, split, trainable):
    lora = LoRAConfig(rank=2, alpha=4.0, targets=("q", "v", "down"), modules=("llm",)) if trainable == "lora" else None
    cfg = tiny_config(6, FROZEN_ENC if lora else trainable, lora=lora)
    check(cfg, ParallelConfig(pipeline_schedule=schedule, **parallel), split, perturb_lora=lora is not None,
          sharded_model=parallel.get("fsdp", 1) > 1)


@pytest.mark.slow
@pytest.mark.parametrize("parallel,split,trainable,forced_budget", [
    # The frozen LLM the schedule is for (dX through every layer under a trainable projector), cut into slices of
    # one layer's backward or two layers' forward per tick: slices on the real decoder layers.
    (dict(pipeline=2, microbatches=3), (2, 4), FROZEN_LLM, 2),
    # The planner's split and slicing (what the train step runs), LoRA adapters stored over fsdp.
    (dict(fsdp=2, pipeline=2, microbatches=2), None, "lora", None),
])
def test_pipelined_model_sliced(parallel, split, trainable, forced_budget, monkeypatch):
    lora = LoRAConfig(rank=2, alpha=4.0, targets=("q", "v", "down"), modules=("llm",)) if trainable == "lora" else None
    cfg = tiny_config(6, FROZEN_ENC if lora else trainable, lora=lora)
    pc = ParallelConfig(pipeline_schedule="1f1b_sliced", **parallel)
    ran = []
    planned_stage_layers = pipelined_step._stage_layers

    def stage_layers(*a, **kw):  # what the step runs; with a forced budget, slices the planner would not choose
        layers, kind, slicing = planned_stage_layers(*a, **kw)
        assert kind == "1f1b_sliced" and slicing is not None and slicing.stage_layers == layers
        if forced_budget:
            slicing = default_slicing(layers, budget=forced_budget)
        ran.append(build_schedule(2, pc.microbatches, kind=kind, slicing=slicing))
        return layers, kind, slicing

    monkeypatch.setattr(pipelined_step, "_stage_layers", stage_layers)
    check(cfg, pc, split, perturb_lora=lora is not None, sharded_model=pc.fsdp > 1)
    if forced_budget:  # forwards and backwards both ran in slices
        assert (ran[0].column("f_lo") > 0).any() and (ran[0].column("b_lo") > 0).any()


@pytest.mark.slow
def test_pipelined_model_with_data_and_tensor():
    # build.create_model's sharded model (per-module rules) on data=2 x pipeline=2 x tensor=2.
    check(tiny_config(6, FROZEN_ENC), ParallelConfig(data=2, pipeline=2, tensor=2, microbatches=2), (1, 5),
          sharded_model=True)


FSDP_PIPELINE_TENSOR = ParallelConfig(fsdp=2, pipeline=2, tensor=2, microbatches=4)


@pytest.mark.slow
@pytest.mark.parametrize("parallel,split", [
    # The frozen encoder's forwards in the bubbles (their encodes inside the stages' context, fsdp and tensor layout).
    (ParallelConfig(pipeline=2, context=2, tensor=2, microbatches=4, pipeline_encoders="bubbles"), (2, 4)),
    (dataclasses.replace(FSDP_PIPELINE_TENSOR, pipeline_encoders="bubbles"), (3, 3)),
    # The LLM's gathers only: encodes in the bubbles gather their encoder's weights and one microbatch's features
    # inside the tick loop.
    (dataclasses.replace(FSDP_PIPELINE_TENSOR, pipeline_fsdp_gather_once=True, pipeline_encoders="outside"), (3, 3)),
], ids=["pipeline2_context2_tensor2", "fsdp2_pipeline2_tensor2_uniform", "fsdp2_pipeline2_tensor2_gather_once"])
def test_pipelined_model_with_context_fsdp_and_tensor(parallel, split):
    # Inside the stages: context-parallel attention (K/V all-gathered over `context`), weights stored over fsdp and
    # gathered per layer (or once per step: pipeline_fsdp_gather_once), heads and MLP split over `tensor`. The
    # stacked layers are stored in per-device blocks over `pipeline`: an uneven split regroups them into stages, a
    # uniform one uses each device's block as it is.
    cfg = tiny_config(6, FROZEN_ENC)
    planned, plans = pipelined_step._encode_plan, []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipelined_step, "_encode_plan", lambda *a, **kw: plans.append(planned(*a, **kw)) or plans[-1])
        hlo = check(cfg, parallel, split, sharded_model=True)
    assert (plans[0] is not None and len(plans[0].microbatches) > 0) == (parallel.pipeline_encoders == "bubbles")
    if parallel.fsdp == 1:
        return
    # The compiled program's FSDP gathers. Per layer: every all-gather inside the tick loop gathers one layer's
    # weight for a forward, a remat recompute or a backward (one per fsdp-sharded leaf at each of the ops' call
    # sites). Once: none inside the loop; before it one all-gather per fsdp-sharded leaf of the stage's stacked
    # [slots, ...] weights, in the compute dtype (float32 here; bfloat16's are checked on the TPU compile,
    # docs/pipeline.md: the CPU compiler computes bfloat16 in float32).
    gathers = all_gathers(hlo)
    in_loop = [g for g in gathers if g[0]]
    stacked = [g for g in gathers if not g[0] and len(g[2]) > 1 and g[2][0] == max(split)]
    leaves = fsdp_layer_leaves(cfg, parallel)
    assert leaves >= 7, leaves  # q, k, v, o, gate, up, down at least
    if parallel.pipeline_fsdp_gather_once:
        assert in_loop == [], in_loop
        assert len(stacked) == leaves and {g[1] for g in stacked} == {"f32"}, stacked
    else:
        assert len(in_loop) >= 2 * leaves and not stacked, (in_loop, stacked)


@pytest.mark.slow
def test_given_uneven_split_moves_its_rows_not_every_layer():
    """ParallelConfig.pipeline_stage_layers=(4, 2) on 6 layers stored in blocks of 3 over fsdp x pipeline: device 0
    runs its block and the first layer of device 1's, which moves by one ppermute per leaf (one row each); no device
    gathers the stack (the runtime did, for every uneven split), and loss and gradients equal one device's."""
    cfg = tiny_config(6, FROZEN_ENC)
    parallel = ParallelConfig(fsdp=2, pipeline=2, microbatches=2, pipeline_stage_layers=(4, 2))
    hlo = check(cfg, parallel, None, sharded_model=True)
    assert not [g for g in all_gathers(hlo) if len(g[2]) > 1 and g[2][0] == 6], "a gather of every layer"
    one_row = re.findall(r"= \w+\[1,[\d,]*\]\S* collective-permute(?:-start)?\(", hlo)
    assert len(one_row) >= fsdp_layer_leaves(cfg, parallel), "the row of layer 3 did not move (not the split given?)"


def test_pipeline_devices_store_only_their_block_of_layers():
    par = ParallelConfig(data=2, pipeline=4, microbatches=4)
    model = create_model(tiny_config(8), make_mesh(par, jax.devices()), par)
    kernel = model.llm.layers.attn.q.kernel[...]
    assert kernel.sharding.shard_shape(kernel.shape)[0] == 2  # 8 layers over 4 stages
    assert model.llm.embed.embedding[...].sharding.shard_shape(model.llm.embed.embedding.shape) == (64, 32)


def _per_device_flops(parallel, config, stage_layers, mb=8):
    mesh = make_mesh(parallel, jax.devices()[: parallel.num_devices])
    run, st = jitted_pipeline(create_model(config, mesh, parallel, seed=0), mesh, parallel, stage_layers)
    with jax.set_mesh(mesh):
        return run.lower(st, make_batch(parallel.microbatches, mb)).compile().cost_analysis()["flops"]


@pytest.mark.slow
def test_tensor_parallelism_inside_the_stages_splits_the_compute():
    # The oracle is the tensor = 1 program: with tensor = 2 every matmul of the stages (and the encoders outside,
    # whose batch spreads over twice the devices) is split in two, so a device does about half the FLOPs. Layers
    # that gathered their weights whole (tensor parallelism in name only) would leave the ratio near 1.
    cfg = tiny_config(4, FROZEN_ENC)
    base = _per_device_flops(ParallelConfig(pipeline=2, microbatches=2), cfg, (2, 2))
    split = _per_device_flops(ParallelConfig(pipeline=2, tensor=2, microbatches=2), cfg, (2, 2))
    assert 0.45 <= split / base <= 0.6, (split, base)


def test_bad_microbatch_count_is_refused():
    cfg = tiny_config(2)
    par = ParallelConfig(pipeline=2, microbatches=4)
    mesh = make_mesh(par, jax.devices()[:2])
    model = create_model(cfg, mesh, par)
    with pytest.raises(ValueError, match="microbatches is 4"):
        pipelined_loss_and_grad(model, make_batch(2, 1), mesh=mesh, parallel_config=par)
    with pytest.raises(ValueError, match="stage_layers"):
        pipelined_loss_and_grad(model, make_batch(4, 1), mesh=mesh, parallel_config=par, stage_layers=(1, 2))


@pytest.mark.slow
@pytest.mark.parametrize("parallel,split,trainable", [
    # The projector and the LLM train: the pipeline's input gradient goes through the projector's vjp after the
    # pipeline, on the features the encodes made inside it.
    (dict(pipeline=4, microbatches=8), (2, 1, 2, 1), FROZEN_ENC),
    # Only the projector trains (dX through every frozen layer), under 1F1B-sliced, the rows over data.
    (dict(data=2, pipeline=2, microbatches=4, pipeline_schedule="1f1b_sliced"), None, FROZEN_LLM),
    # Nothing upstream trains: the encodes' features are not needed after the pipeline.
    (dict(pipeline=4, microbatches=6, pipeline_schedule="zb_h1"), (1, 2, 2, 1), FROZEN_ENC_PROJ),
])
def test_encoders_in_the_bubbles_match_one_device(parallel, split, trainable, monkeypatch):
    plans = []
    planned = pipelined_step._encode_plan

    def encode_plan(*a, **kw):
        plans.append(planned(*a, **kw))
        return plans[-1]

    monkeypatch.setattr(pipelined_step, "_encode_plan", encode_plan)
    pc = ParallelConfig(pipeline_encoders="bubbles", **parallel)
    check(tiny_config(6, trainable), pc, split)
    # The encodes ran inside: some microbatches, never device 0's own, the rest outside.
    (plan,) = plans
    K = plan.per_device
    assert plan is not None and 0 < len(plan.microbatches) < pc.microbatches
    assert min(plan.microbatches) >= K and plan.counts[:, 0].sum() == 0


def test_encoders_in_the_bubbles_are_refused_where_they_cannot_run():
    cfg = tiny_config(4, {})  # the encoder trains
    pc = ParallelConfig(pipeline=2, microbatches=2, pipeline_encoders="bubbles")
    mesh = make_mesh(pc, jax.devices()[:2])
    model = MultimodalModel(cfg, rngs=nnx.Rngs(0))
    with jax.set_mesh(mesh), pytest.raises(ValueError, match=r"pipeline_encoders='bubbles'.*vision.*train"):
        pipelined_loss_and_grad(model, make_batch(2, 2), mesh=mesh, parallel_config=pc, stage_layers=(2, 2))
    with pytest.raises(ValueError, match="pipeline_encoders must be one of"):
        ParallelConfig(pipeline_encoders="inside")
