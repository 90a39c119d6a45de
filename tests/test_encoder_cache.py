"""Frozen encoders cost almost nothing: no backward on the compiled program, and a feature cache
(mllm_jax.data.encoder_cache) that returns bit-identical features, is invalidated by other weights, config or
preprocessing, recomputes a corrupt entry instead of trusting it, and keeps a resumed run's losses."""

import dataclasses
import os

import jax
import numpy as np
import pytest
from flax import nnx

from mllm_jax.build import create_model
from mllm_jax.config import LLMConfig, ModelConfig, NativeVisionConfig, ProjectorConfig, VisionConfig
from mllm_jax.data import SyntheticBatches, TextCodec
from mllm_jax.data import encoder_cache as ec
from mllm_jax.data.batching import unstack_first
from mllm_jax.freeze import trainable_filter
from mllm_jax.multimodal import MultimodalModel
from mllm_jax.parallel.config import ParallelConfig
from mllm_jax.parallel.mesh import make_mesh
from mllm_jax.train.config import DataConfig
from tests.train_main import TINY, losses, run_main

CODEC = TextCodec()
FROZEN = {"encoders/vision": False}
DATA = DataConfig(batch_size=4, seq_len=64, samples_per_row=2, mixture={"image": 3.0, "text": 1.0}, max_images=2,
                  epoch_samples=16)  # 8 samples a batch: step 2 starts the second epoch


def _config(**kw) -> ModelConfig:
    kw.setdefault("trainable", FROZEN)
    return ModelConfig(
        llm=LLMConfig(vocab_size=80, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48),
        encoders={"vision": kw.pop("vision", VisionConfig(kind="vit", image_size=8, patch_size=4, d_model=16,
                                                          n_layers=2, n_heads=2, d_ff=32, class_token=False,
                                                          pre_norm=False))},
        projectors={"vision": ProjectorConfig(kind="mlp")},
        placeholder_ids={"vision": CODEC.placeholder_ids()["vision"]}, **kw)


def _compiled_cost(fn, *args) -> tuple[float, int]:
    """(FLOPs, temporary bytes) of the compiled CPU program."""
    compiled = jax.jit(fn).lower(*args).compile()
    cost = compiled.cost_analysis()
    return float((cost[0] if isinstance(cost, list) else cost)["flops"]), compiled.memory_analysis().temp_size_in_bytes



def _nudge_one_weight(enc) -> None:
    """The frozen tower with one weight moved by one ulp: another tower for the cache's fingerprint."""
    leaves, treedef = jax.tree_util.tree_flatten(enc.states["vision"])
    a = np.array(leaves[0])
    a.flat[0] = np.nextafter(a.flat[0], np.float32(np.inf))
    leaves[0] = jax.device_put(a, leaves[0].sharding)
    enc.states["vision"] = jax.tree_util.tree_unflatten(treedef, leaves)

def test_frozen_encoder_grad_step_costs_one_encoder_forward():
    """Compiled FLOPs (XLA's cost analysis of the CPU program): the gradient step with a frozen encoder costs the
    step from precomputed features plus one encoder forward, to 2%: no backward (its dX alone would add ~1 forward,
    dX + dW ~2), no recompute. No saved activations: its temporaries exceed the features step's by at most the
    forward's own (measured: +33 KB against a 185 KB forward; a trainable encoder's step adds 1.7 MB)."""
    vision = VisionConfig(kind="vit", image_size=16, patch_size=4, d_model=32, n_layers=2, n_heads=2, d_ff=64,
                          class_token=False, pre_norm=False)
    config = _config(vision=vision)
    batch = unstack_first(SyntheticBatches(config, DATA, codec=CODEC).batch_at(0))
    frozen = MultimodalModel(config, rngs=nnx.Rngs(0))

    def grad_step(model, b):
        gdef, params, rest = nnx.split(model, trainable_filter(model.config), ...)

        def loss(p):
            s, c = nnx.merge(gdef, p, rest).loss(b)
            return s / c

        return jax.grad(loss)(params)

    def step_cost(model, b):
        gdef, state = nnx.split(model)
        return _compiled_cost(lambda st, bb: grad_step(nnx.merge(gdef, st), bb), state, b)

    gdef, state = nnx.split(frozen)
    pixels = batch["encoder_inputs"]["vision"]
    forward, forward_temp = _compiled_cost(lambda st, x: nnx.merge(gdef, st).encoder_features("vision", x), state,
                                           pixels)
    feats = np.asarray(jax.jit(lambda st, x: nnx.merge(gdef, st).encoder_features("vision", x))(state, pixels))
    cached = {k: v for k, v in batch.items() if k != "encoder_inputs"}
    cached["encoder_features"] = {"vision": feats}
    (with_encoder, temp_with), (from_features, temp_from) = step_cost(frozen, batch), step_cost(frozen, cached)
    assert forward > 0.1 * from_features  # the encoder is a visible share of the step
    np.testing.assert_allclose(with_encoder - from_features, forward, rtol=0.02)
    assert temp_with - temp_from <= forward_temp


def _setup(tmp_path, config=None, data=DATA, seed=0):
    config = config or _config()
    pc = ParallelConfig(data=8)
    mesh = make_mesh(pc)
    model = create_model(config, mesh, pc, seed=seed)
    stream = SyntheticBatches(config, data, codec=CODEC)
    enc = ec.FrozenEncoders(model, mesh, pc, ["vision"])
    return model, mesh, stream, enc, ec.open_cache(str(tmp_path), config, data, enc)


def _used(batch, config):
    fi = batch["feature_index"]["vision"][0]
    return np.unique(fi[fi >= 0] // config.features_per_instance("vision"))


def test_cache_returns_bit_identical_features_across_epochs_and_processes(tmp_path):
    config = _config()
    model, mesh, stream, enc, cache = _setup(tmp_path, config)
    batch = stream.batch_at(0)
    used = _used(batch, config)
    out = cache.features(batch, stream.instance_keys(0), enc)
    assert cache.counts == {"hits": 0, "misses": len(used), "corrupt": 0} and len(used) > 0
    assert "encoder_inputs" not in out
    feats = out["encoder_features"]["vision"][0]
    # Against the model's own encoder on the whole batch (another program: float round-off only).
    with jax.set_mesh(mesh):
        ref = np.asarray(nnx.jit(lambda m, x: m.encoder_features("vision", x))(
            model, batch["encoder_inputs"]["vision"][0]))
    np.testing.assert_allclose(feats[used], ref[used], rtol=1e-5, atol=1e-6)
    unused = np.setdiff1d(np.arange(feats.shape[0]), used)
    assert not feats[unused].any()
    # The next epoch (step 2 holds samples 0..7 again) and a fresh cache over the same folder (a new process, a
    # resumed run) hit every entry and return the very same bits.
    again = cache.features(stream.batch_at(2), stream.instance_keys(2), enc)
    fresh = ec.open_cache(str(tmp_path), config, DATA, enc)
    third = fresh.features(batch, stream.instance_keys(0), enc)
    assert cache.counts["hits"] == len(used) and fresh.counts == {"hits": len(used), "misses": 0, "corrupt": 0}
    for o in (again, third):
        assert np.array_equal(o["encoder_features"]["vision"], out["encoder_features"]["vision"])
    # The loss from cached features is the loss from pixels.
    with jax.set_mesh(mesh):
        loss = nnx.jit(lambda m, b: m.loss(b))
        s0, c0 = loss(model, unstack_first(batch))
        s1, c1 = loss(model, unstack_first(out))
    np.testing.assert_allclose(float(s1 / c1), float(s0 / c0), rtol=1e-6)


def test_a_hosts_rows_get_their_own_entries(tmp_path):
    """Several processes: a host holds rows ``rows`` of each microbatch (local_synthetic_batch) whose feature_index
    is global; with its span it looks up exactly its rows' entries (here written by the whole batch's lookup: all
    hits, the very same bits), and a wrong span is refused, never another row's features."""
    from mllm_jax.data.batching import local_synthetic_batch

    config = _config()
    model, mesh, stream, enc, cache = _setup(tmp_path, config)
    whole = cache.features(stream.batch_at(0), stream.instance_keys(0), enc)["encoder_features"]["vision"]
    n = whole.shape[1] // 2
    for span, rows in enumerate((slice(0, 2), slice(2, 4))):  # two hosts of DATA's 4 rows
        host = ec.open_cache(str(tmp_path), config, DATA, enc)
        got = host.features(local_synthetic_batch(stream, 0, rows), stream.instance_keys(0, rows), enc, span=span)
        assert np.array_equal(got["encoder_features"]["vision"], whole[:, span * n:(span + 1) * n])
        assert host.counts["misses"] == 0 and host.counts["hits"] > 0
    first, second = slice(0, 2), slice(2, 4)
    with pytest.raises(ValueError, match=rf"before this host's rows \[{n}, {2 * n}\) \(span=1\)"):
        cache.features(local_synthetic_batch(stream, 0, first), stream.instance_keys(0, first), enc, span=1)
    with pytest.raises(ValueError, match=rf"points at encoder row \d+ but there are {n} rows"):
        cache.features(local_synthetic_batch(stream, 0, second), stream.instance_keys(0, second), enc, span=0)


def _native_config() -> ModelConfig:
    enc = NativeVisionConfig(patch_size=4, d_model=16, n_layers=1, n_heads=2, d_ff=32, min_pixels=16 * 16,
                             max_pixels=48 * 48, patches_per_row=256)
    return ModelConfig(llm=LLMConfig(vocab_size=80, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64,
                                     mrope_section=(2, 3, 3)),
                       encoders={"vision": enc}, projectors={"vision": ProjectorConfig(kind="patch_merger")},
                       placeholder_ids={"vision": 3}, media_attention="causal", trainable=FROZEN)


def test_native_resolution_instances_are_cached_by_content(tmp_path):
    """A native-resolution tower (packed patch rows of images and videos of several sizes): one entry per instance,
    its per-patch pre-projector features [n, D_enc], keyed by its patches and grid (zeros at padding). A fresh cache
    hits every instance with the same bits, wherever the instance is packed (rows reversed); the loss from cached
    features is the loss from pixels (the tower run inside the model on the same rows); one ulp of one weight is
    another folder."""
    config = _native_config()
    data = DataConfig(batch_size=8, seq_len=128, samples_per_row=2, mixture={"image": 1.0, "video": 1.0, "text": 0.3})
    model, mesh, stream, enc, cache = _setup(tmp_path, config, data)
    batch = stream.batch_at(0)
    rows = batch["encoder_inputs"]["vision"]
    seg = rows["segment_ids"]
    instances = sum(len(np.unique(r[r > 0])) for r in seg.reshape(-1, seg.shape[-1]))  # brute-force count
    out = cache.features(batch, stream.instance_keys(0), enc)
    assert cache.counts == {"hits": 0, "misses": instances, "corrupt": 0} and instances > 4
    feats = out["encoder_features"]["vision"]
    assert feats.shape == seg.shape + (16,) and len(os.listdir(cache.stores["vision"].directory)) == instances
    assert not feats[seg == 0].any() and feats[seg > 0].std() > 0.1
    # A fresh cache (another process, a later epoch) over the same folder, the rows packed in another order.
    fresh = ec.open_cache(str(tmp_path), config, data, enc)
    flipped = {**batch, "encoder_inputs": {"vision": {k: v[:, ::-1] for k, v in rows.items()}}}
    again = fresh.features(flipped, stream.instance_keys(0), enc)["encoder_features"]["vision"]
    assert fresh.counts == {"hits": instances, "misses": 0, "corrupt": 0}
    assert np.array_equal(again, feats[:, ::-1])
    with jax.set_mesh(mesh):
        loss = nnx.jit(lambda m, b: m.loss(b))
        (s0, c0), (s1, c1) = loss(model, unstack_first(batch)), loss(model, unstack_first(out))
    np.testing.assert_allclose(float(s1 / c1), float(s0 / c0), rtol=1e-6)
    # Another tower (one ulp of one weight): another folder, every instance a miss.
    _nudge_one_weight(enc)
    other = ec.open_cache(str(tmp_path), config, data, enc)
    assert other.stores["vision"].directory != cache.stores["vision"].directory
    other.features(batch, stream.instance_keys(0), enc)
    assert other.counts == {"hits": 0, "misses": instances, "corrupt": 0}


def test_changed_encoder_weights_config_or_preprocessing_invalidate(tmp_path):
    config = _config()
    model, mesh, stream, enc, cache = _setup(tmp_path, config)
    cache.features(stream.batch_at(0), stream.instance_keys(0), enc)
    folder = cache.stores["vision"].directory
    # One weight changed by one ulp: another fingerprint, another folder, every instance a miss.
    _nudge_one_weight(enc)
    other = ec.open_cache(str(tmp_path), config, DATA, enc)
    assert other.stores["vision"].directory != folder
    other.features(stream.batch_at(0), stream.instance_keys(0), enc)
    assert other.counts["hits"] == 0 and other.counts["misses"] > 0
    # Encoder config and preprocessing are in the fingerprint too.
    digest = ec.weights_digest(enc.states["vision"])
    base = ec.fingerprint("vision", config, DATA, digest)
    deeper = config.replace(encoders={"vision": dataclasses.replace(config.encoders["vision"], select_layer=-2)})
    assert ec.fingerprint("vision", deeper, DATA, digest) != base
    assert ec.fingerprint("vision", config, dataclasses.replace(DATA, seed=1), digest) != base
    assert ec.fingerprint("vision", config, dataclasses.replace(DATA, batch_size=8), digest) == base


def test_corrupt_entry_is_recomputed_not_trusted(tmp_path):
    config = _config()
    model, mesh, stream, enc, cache = _setup(tmp_path, config)
    first = cache.features(stream.batch_at(0), stream.instance_keys(0), enc)["encoder_features"]["vision"]
    store = cache.stores["vision"]
    keys = stream.instance_keys(0)["vision"][0]
    used = _used(stream.batch_at(0), config)
    flipped, truncated, reshaped = (store.path(keys[s]) for s in used[:3])
    blob = bytearray(open(flipped, "rb").read())
    blob[-40] ^= 1  # one bit of the array's last bytes
    open(flipped, "wb").write(bytes(blob))
    open(truncated, "wb").write(open(truncated, "rb").read()[:100])
    open(reshaped, "wb").write(ec.encode_entry(np.zeros((3, 3), np.float32)))  # a valid digest, a wrong shape
    fresh = ec.open_cache(str(tmp_path), config, DATA, enc)
    again = fresh.features(stream.batch_at(0), stream.instance_keys(0), enc)["encoder_features"]["vision"]
    assert fresh.counts == {"hits": len(used) - 3, "misses": 3, "corrupt": 3}
    np.testing.assert_allclose(again, first, rtol=1e-6, atol=1e-7)
    for p in (flipped, truncated, reshaped):  # rewritten whole
        assert ec.decode_entry(open(p, "rb").read(), store.shape, store.dtype) is not None
    assert not [f for f in os.listdir(store.directory) if f.endswith(".tmp")]


@pytest.mark.slow
def test_resumed_run_with_cache_trains_like_the_uncached_run(tmp_path):
    """train.py: a frozen-encoder run with the cache, stopped at step 2 and resumed to 4 (its second epoch reads the
    entries the first invocation wrote, untouched), has the uncached run's losses. Held-out batches are cached too
    (evaluations at steps 2 and 4): under their own "eval:" keys, stored by the first evaluation and read untouched
    by the second (a hit: nothing rewritten), with the uncached run's eval metrics."""
    params = TINY + ["TrainConfig.steps = 4", "TrainConfig.checkpoint_every = 2", "DataConfig.epoch_samples = 32",
                     "DataConfig.samples_per_row = 1", "ParallelConfig.data = 8", "TrainConfig.eval_every = 2"]
    plain = run_main(str(tmp_path / "plain"), params, gin_file="configs/vlm_tiny_frozen.gin")
    ref = losses(plain)
    cache = tmp_path / "cache"
    cached = params + [f"DataConfig.encoder_cache = '{cache}'"]
    first = run_main(str(tmp_path / "cached"), cached + ["TrainConfig.stop_at_step = 2"],
                     gin_file="configs/vlm_tiny_frozen.gin")
    (folder,) = os.listdir(cache)
    entries = sorted(os.listdir(cache / folder))
    train_entries = [e for e in entries if e.startswith("train:")]
    eval_entries = [e for e in entries if e.startswith("eval:")]
    assert len(train_entries) == 32  # one epoch: 2 steps x 16 image samples
    assert len(eval_entries) == 16 and len(entries) == 48  # one held-out batch of 16 image samples, its own keys
    mtimes = {e: os.stat(cache / folder / e).st_mtime_ns for e in entries}
    rows = run_main(str(tmp_path / "cached"), cached, gin_file="configs/vlm_tiny_frozen.gin")
    assert {e: os.stat(cache / folder / e).st_mtime_ns for e in os.listdir(cache / folder)} == mtimes
    got = losses(rows)
    assert sorted(got) == sorted(ref) == [1, 2, 3, 4]
    for step in ref:
        np.testing.assert_allclose(got[step], ref[step], rtol=2e-5)
    evals = {r["step"]: r for r in first + rows if "eval_loss" in r}
    want = {r["step"]: r for r in plain if "eval_loss" in r}
    assert sorted(evals) == sorted(want) == [2, 4]
    for step in want:
        for key in [k for k in want[step] if k.startswith("eval_")]:
            assert evals[step][key] == want[step][key], (step, key, evals[step][key], want[step][key])


@pytest.mark.slow
def test_pipeline_from_balanced_cached_features_equals_pixels(tmp_path):
    """pipeline=2 x data=4: the pipelined step from cached features, balanced over the devices, gives the loss and
    gradients of the row-bound step from pixels (the projector and the LLM train; the encoder is frozen)."""
    from mllm_jax.data.encoder_balance import balance_batch
    from tests.test_encoder_balance import _loss_and_grads

    config = _config()
    pc = ParallelConfig(data=4, pipeline=2, microbatches=2)
    mesh = make_mesh(pc)
    data = dataclasses.replace(DATA, batch_size=8)  # 4 rows a microbatch: the pipeline's row layout over data=4
    stream = SyntheticBatches(config, data, microbatches=2, codec=CODEC)
    enc = ec.FrozenEncoders(create_model(config, mesh, pc, seed=0), mesh, pc, ["vision"])
    host = stream.batch_at(0)
    cached = ec.open_cache(str(tmp_path), config, data, enc).features(host, stream.instance_keys(0), enc)
    cached = balance_batch(cached, config, pc, leading=1)
    assert set(cached) - set(host) == {"encoder_features"} and "encoder_inputs" not in cached
    loss_p, grads_p = _loss_and_grads(config, pc, host)
    loss_c, grads_c = _loss_and_grads(config, pc, cached)
    np.testing.assert_allclose(loss_c, loss_p, rtol=1e-6)
    flat_p, flat_c = jax.tree.leaves(grads_p), jax.tree.leaves(grads_c)
    assert len(flat_p) == len(flat_c) > 0
    for gp, gc in zip(flat_p, flat_c):
        np.testing.assert_allclose(gc, gp, rtol=1e-5, atol=1e-7)
