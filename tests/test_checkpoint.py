"""Checkpointer: round trip into other shardings, keep-last-K, model attribute names in the saved paths, and an
incompatible model refused with a message naming what differs (in-process, small trees)."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from mllm_jax.config import LLMConfig, ModelConfig
from mllm_jax.train.checkpoint import Checkpointer


def _tree(mesh, spec):
    sh = NamedSharding(mesh, spec)
    x = jnp.arange(64.0, dtype=jnp.float32).reshape(8, 8)
    return {
        "model": {"llm": {"w": jax.device_put(x, sh)}, "encoders": {"vision": {"w": jax.device_put(x * 2, sh)}},
                  "projectors": {"vision": {"b": jnp.ones((3,), jnp.float32)}}},
        "optimizer": {"step": jnp.asarray(5, jnp.int32), "opt_state": {0: {"mu": jax.device_put(x * 3, sh)}}},
    }


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def test_round_trip_across_shardings_keep_last_k_and_paths(tmp_path):
    cfg = ModelConfig(llm=LLMConfig(n_layers=2))
    mesh8 = jax.make_mesh((8,), ("data",), devices=jax.devices()[:8])
    saved = _tree(mesh8, P("data"))
    ck = Checkpointer(str(tmp_path), every=1, keep=2)
    for step in (1, 2, 3):
        ck.save(step, saved, {"index": step, "seed": 0, "split": "train"}, cfg)
    ck.wait()
    assert ck.all_steps() == [2, 3]
    # Restore on a one-device mesh: arrays arrive with the target's sharding and the saved values.
    mesh1 = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
    target = _abstract(_tree(mesh1, P()))
    ck.check_compatible(3, target, cfg)
    tree, data = ck.restore(3, target)
    ck.close()
    assert data == {"index": 3, "seed": 0, "split": "train"}
    for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(saved)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert tree["model"]["llm"]["w"].sharding.num_devices == 1
    paths = Checkpointer(str(tmp_path), every=1, keep=2).saved_paths(3)
    assert "model/llm/w" in paths and "model/encoders/vision/w" in paths and "model/projectors/vision/b" in paths
    assert "optimizer/opt_state/0/mu" in paths


def test_incompatible_model_is_refused_naming_the_difference(tmp_path):
    cfg = ModelConfig(llm=LLMConfig(n_layers=2))
    mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
    ck = Checkpointer(str(tmp_path), every=1, keep=2)
    ck.save(1, _tree(mesh, P()), {"index": 1}, cfg)
    ck.wait()
    other = dataclasses.replace(cfg, llm=LLMConfig(n_layers=3))
    bigger = _tree(mesh, P())
    bigger["model"]["llm"]["w"] = jnp.zeros((8, 9), jnp.float32)
    with pytest.raises(ValueError, match=r"n_layers: checkpoint 2 vs now 3.*model/llm/w: checkpoint \[8, 8\] vs "
                                         r"model \[8, 9\]"):
        ck.check_compatible(1, _abstract(bigger), other)
    ck.close()


def test_checksums_are_written_and_any_changed_byte_is_named(tmp_path):
    from mllm_jax.train.checkpoint import CHECKSUMS, CheckpointCorruptError, verify_checksums

    cfg = ModelConfig(llm=LLMConfig(n_layers=2))
    mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
    ck = Checkpointer(str(tmp_path), every=1, keep=2)  # async: checksums follow the commit
    ck.save(1, _tree(mesh, P()), {"index": 1}, cfg)
    ck.close()
    step_dir = os.path.join(str(tmp_path), "checkpoints", "1")
    assert os.path.exists(os.path.join(step_dir, CHECKSUMS)) and verify_checksums(1, step_dir)
    data = os.path.join(step_dir, "data")
    victim = os.path.join(data, sorted(os.listdir(data))[0])
    with open(victim, "r+b") as f:
        first = f.read(1)
        f.seek(0)
        f.write(bytes([first[0] ^ 1]))
    with pytest.raises(CheckpointCorruptError, match=rf"step 1 is corrupt: {victim}: contents differ"):
        verify_checksums(1, step_dir)


def test_a_lock_from_another_host_is_never_taken_over(tmp_path):
    import json

    from mllm_jax.train.checkpoint import WorkdirLock, WorkdirLockedError

    with open(tmp_path / "lock", "w") as f:
        json.dump({"host": "some-other-host", "pid": 1}, f)
    with pytest.raises(WorkdirLockedError, match=r"in use by another run.*some-other-host.*delete the lock file"):
        WorkdirLock(str(tmp_path)).acquire()
    os.remove(tmp_path / "lock")
    with WorkdirLock(str(tmp_path)) as lock:
        assert json.load(open(lock.path))["pid"] == os.getpid()
        with pytest.raises(WorkdirLockedError):  # this very process holds it: a nested run is refused too
            WorkdirLock(str(tmp_path)).acquire()
    assert not os.path.exists(tmp_path / "lock") and os.listdir(tmp_path) == []


def test_one_process_saves_replicated_arrays_without_compiling(tmp_path):
    # Orbax's default replica-parallel save slices every replicated array per replica with eager ops that compile a
    # program per shape; one process writes every byte anyway, so its saves must compile nothing (the oracle: jax's
    # own count of backend compiles during the save) and still restore the same values.
    from jax._src import monitoring

    mesh8 = jax.make_mesh((8,), ("data",), devices=jax.devices()[:8])
    rep = NamedSharding(mesh8, P())
    saved = {f"w{i}": jax.device_put(jnp.full((16, 5 + i), float(i)), rep) for i in range(4)}
    jax.block_until_ready(saved)
    compiles = []

    def listen(event, duration, **_):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(duration)

    ck = Checkpointer(str(tmp_path), every=1, keep=1, async_save=False)
    monitoring.register_event_duration_secs_listener(listen)
    try:
        ck.save(1, saved, {"index": 1}, ModelConfig(llm=LLMConfig(n_layers=2)))
    finally:
        monitoring.unregister_event_duration_listener(listen)
    tree, _ = ck.restore(1, _abstract(saved))
    ck.close()
    assert compiles == [], f"the save compiled {len(compiles)} programs"
    for name, a in saved.items():
        np.testing.assert_array_equal(np.asarray(tree[name]), np.asarray(a), err_msg=name)
