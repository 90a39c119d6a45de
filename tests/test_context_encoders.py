"""Encoders under context parallelism (docs/architecture.md, data flow step 4), on 8 fake devices.

With ParallelConfig(data=2, context=4) the LLM's sequence is sharded over `context`, and the images and audio clips
of the batch are shared out over every device (data x context = 8): each device encodes N/8 of them, the projected
features are gathered for injection into the (permuted, context-sharded) sequence, and the hidden states equal one
device's. Measured with the compiled per-device FLOPs (`cost_analysis`), the honest CPU measure of who computes what.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mllm_jax.config import AudioConfig, LLMConfig, ModelConfig, ProjectorConfig, VisionConfig
from mllm_jax.multimodal import num_features
from mllm_jax.parallel.config import ContextConfig, ParallelConfig
from mllm_jax.parallel.context import permute_batch, plan, unpermute

# Per batch: 16 = 2 per device over data x context. (Not 1 per device: XLA's FLOP count of a batch-1 program is not
# 1/N of a batch-N one, so a one-per-device split would read as less than 1/8 of the work; from 2 up it is linear.)
N_IMAGES = N_CLIPS = 16
PER_ROW = 8
VISION_ID, AUDIO_ID = 1, 2
CONFIG = ModelConfig(
    llm=LLMConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=48),
    encoders={
        "vision": VisionConfig(image_size=16, patch_size=4, d_model=32, n_layers=2, n_heads=2, d_ff=64),
        "audio": AudioConfig(n_mels=8, max_source_positions=4, d_model=32, n_layers=1, n_heads=2, d_ff=64),
    },
    projectors={"vision": ProjectorConfig(kind="mlp"), "audio": ProjectorConfig(kind="linear")},
    placeholder_ids={"vision": VISION_ID, "audio": AUDIO_ID},
)
CP = ParallelConfig(data=2, context=4, context_config=ContextConfig(mode="balanced", block=16))


def _batch(seed=0):
    """2 rows of 256 tokens; row r holds images and clips 8r..8r+7 between text tokens, so every image and clip is
    used once (features flattened [N * T, D], feature_index points into them)."""
    rng = np.random.default_rng(seed)
    b, s = 2, 256
    nv, na = num_features(CONFIG, "vision"), num_features(CONFIG, "audio")
    ids = rng.integers(3, 64, (b, s)).astype(np.int32)
    fi = {name: -np.ones((b, s), np.int32) for name in ("vision", "audio")}
    span = np.zeros((b, s), np.int32)
    for r in range(b):
        t, sid = 2, 1
        for j in range(PER_ROW):
            for name, n, pid in (("vision", nv, VISION_ID), ("audio", na, AUDIO_ID)):
                inst = PER_ROW * r + j
                ids[r, t:t + n] = pid
                fi[name][r, t:t + n] = np.arange(inst * n, (inst + 1) * n)
                span[r, t:t + n] = sid
                t, sid = t + n + 1, sid + 1  # one text token between instances
        assert t < s
    nxt = np.concatenate([ids[:, 1:], np.zeros((b, 1), np.int32)], axis=1)
    labels = np.where((nxt < 3) | (ids < 3), -100, nxt).astype(np.int32)  # shifted before any permutation
    labels[:, -1] = -100
    return dict(
        input_ids=ids, labels=labels, positions=np.tile(np.arange(s, dtype=np.int32), (b, 1)),
        segment_ids=np.ones((b, s), np.int32), span_ids=span, feature_index=fi,
        encoder_inputs={
            "vision": rng.normal(size=(N_IMAGES, 16, 16, 3)).astype(np.float32),
            "audio": rng.normal(size=(N_CLIPS, 8, 8)).astype(np.float32),
        },
    )


@pytest.fixture(scope="module")
def one_device_model():
    from mllm_jax.build import create_model
    from mllm_jax.parallel.mesh import make_mesh

    pc = ParallelConfig()
    return create_model(CONFIG, make_mesh(pc, devices=jax.devices()[:1]), pc, seed=0)


def _on_layout(model, pc):
    """(mesh, graphdef, params) of ``model``'s weights placed as build.create_model places them for ``pc``."""
    from mllm_jax.build import abstract_model
    from mllm_jax.parallel.mesh import make_mesh

    mesh = make_mesh(pc, devices=jax.devices()[: pc.num_devices])
    gdef, abstract = nnx.split(abstract_model(CONFIG, mesh, pc, seed=0))
    state = nnx.state(model)
    placed = jax.tree.map(lambda x, a: jax.device_put(x, NamedSharding(mesh, a.sharding.spec)), state, abstract)
    return mesh, gdef, placed


def _encoder_flops(model, pc, name, inputs):
    """Per-device FLOPs of the compiled encoder + projector of ``name`` on ``pc``'s mesh (inputs replicated: the
    model's own layout decides who encodes what)."""
    mesh, gdef, state = _on_layout(model, pc)
    f = jax.jit(lambda state, x: nnx.merge(gdef, state).encode(name, x))
    with jax.set_mesh(mesh):
        x = jax.device_put(inputs, NamedSharding(mesh, P()))
        return f.lower(state, x).compile().cost_analysis()["flops"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vision", "audio"])
def test_each_device_encodes_only_its_share(one_device_model, name):
    # Lower bound: the work cannot shrink below 1/8 per device. Upper bound: if any pair of devices encoded the same
    # instances (the batch sharded over data only, or over context only), a device would do >= 2/8 of it. The band
    # [0.95, 1.25] x 1/8 leaves room only for work that does not scale with N (parameter casts, layouts: < 5% here),
    # and the control run below, with the encoder batch not sharded over `context`, must land at 1/2.
    inputs = _batch()["encoder_inputs"][name]
    one = _encoder_flops(one_device_model, ParallelConfig(), name, inputs)
    per_device = _encoder_flops(one_device_model, CP, name, inputs)
    assert 0.95 / 8 <= per_device / one <= 1.25 / 8, (per_device, one)
    not_context = ("data", "fsdp", "pipeline", "tensor")  # every axis but context (fsdp kept: see the report)
    no_cp = ParallelConfig(data=2, context=4, rules={f"encoders/{name}": {"batch": not_context},
                                                     f"projectors/{name}": {"batch": not_context}})
    control = _encoder_flops(one_device_model, no_cp, name, inputs)
    assert 0.95 / 2 <= control / one <= 1.25 / 2, (control, one)


def _text_only(batch):
    """The same tokens with no encoder work (placeholders keep their text embeddings)."""
    return {k: v for k, v in batch.items() if k not in ("encoder_inputs", "feature_index")}


@pytest.mark.slow
def test_forward_on_data_x_context_equals_one_device(one_device_model):
    # The whole model on data=2 x context=4 with a balanced context plan (tokens permuted, sequence context-sharded)
    # gives one device's hidden states; and inside that one compiled forward the encoder work per device (the FLOPs
    # the encoder inputs add to the program) is 1/8 of one device's, in the band argued in the test above.
    from mllm_jax.kernels import TokenMeta

    batch = _batch()
    p = plan(TokenMeta(batch["positions"], batch["segment_ids"], batch["span_ids"]), CP.context,
             CP.context_config.mode, block=CP.context_config.block, tile_k=8)
    flops, hidden = {}, {}
    for pc, b in ((ParallelConfig(), batch), (CP, permute_batch(batch, p))):
        mesh, gdef, state = _on_layout(one_device_model, pc)
        forward = jax.jit(lambda state, batch, gdef=gdef: nnx.merge(gdef, state)(batch))
        with jax.set_mesh(mesh):
            for kind, bb in (("full", b), ("text", _text_only(b))):
                compiled = forward.lower(state, jax.tree.map(jnp.asarray, bb)).compile()
                flops[pc.context, kind] = compiled.cost_analysis()["flops"]
            hidden[pc.context] = forward(state, jax.tree.map(jnp.asarray, b))
    np.testing.assert_allclose(unpermute(np.asarray(hidden[4]), p), np.asarray(hidden[1]), atol=2e-5, rtol=1e-4)
    encoders_one = flops[1, "full"] - flops[1, "text"]
    encoders_per_device = flops[4, "full"] - flops[4, "text"]
    assert encoders_one > 0
    assert 0.95 / 8 <= encoders_per_device / encoders_one <= 1.25 / 8, flops
