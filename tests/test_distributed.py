"""mllm_jax.distributed in one process: cluster detection, argument errors, this host's rows, global batches, and
the synthetic stream's per-host shares (which must tile the global batch exactly)."""

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from mllm_jax import distributed
from mllm_jax.data import batching


@pytest.mark.parametrize("env, tpu_vm, want", [
    ({}, False, None),
    ({"SLURM_JOB_ID": "7", "SLURM_PROCID": "1", "SLURM_NTASKS": "4"}, False, "slurm"),
    ({"SLURM_JOB_ID": "7", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}, False, None),  # one task: nobody to meet
    ({"SLURM_JOB_ID": "7"}, False, None),  # salloc shell, not started by srun
    ({"OMPI_COMM_WORLD_SIZE": "2"}, False, "openmpi"),
    ({"OMPI_COMM_WORLD_SIZE": "1"}, False, None),
    ({"TPU_WORKER_ID": "3"}, False, "tpu"),
    ({"TPU_WORKER_HOSTNAMES": "a,b"}, False, "tpu"),
    ({}, True, "tpu"),
])
def test_detect_cluster(env, tpu_vm, want):
    assert distributed.detect_cluster(env, tpu_vm=tpu_vm) == want


def test_initialize_without_a_cluster_is_single_process(monkeypatch):
    called = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: called.append(a))
    monkeypatch.setattr(distributed, "_on_tpu_vm", lambda: False)
    assert distributed.initialize(environ={}) is None
    assert called == []
    env = {"SLURM_JOB_ID": "7", "SLURM_PROCID": "1", "SLURM_NTASKS": "2"}
    assert distributed.initialize(environ=env) == "slurm"
    assert called == [(None, None, None)]  # JAX reads the rest from SLURM's variables
    assert distributed.initialize("10.0.0.1:1234", 2, 1, environ={}) == "flags"
    assert called[-1] == ("10.0.0.1:1234", 2, 1)


@pytest.mark.parametrize("args, match", [
    (("localhost", 2, 0), "coordinator_address must be HOST:PORT"),
    (("localhost:99999", 2, 0), "HOST:PORT"),
    (("127.0.0.1:1234", 0, 0), "num_processes must be >= 1; got 0"),
    (("127.0.0.1:1234", 2, 2), r"process_id must be in \[0, num_processes=2\); got 2"),
])
def test_initialize_rejects_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        distributed.initialize(*args, environ={})


def _mesh(data=8, fsdp=1):
    return jax.make_mesh((data, fsdp), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)


def test_host_local_slice_single_process_is_everything_and_checks_divisibility():
    assert distributed.host_local_slice(16, _mesh(4, 2)) == slice(0, 16)
    with pytest.raises(ValueError, match="global_batch_rows=12 is not divisible by the 8 shards"):
        distributed.host_local_slice(12, _mesh())


def test_global_batch_equals_device_put():
    mesh = _mesh(4, 2)
    rng = np.random.default_rng(0)
    tree = {"tokens": rng.integers(0, 9, (2, 8, 5)).astype(np.int32), "pixels": rng.normal(size=(2, 16, 3, 3)).astype(np.float32)}
    out = distributed.global_batch(tree, mesh, P(None, ("data", "fsdp")))
    for key, x in tree.items():
        want = jax.device_put(x, NamedSharding(mesh, P(None, ("data", "fsdp"))))
        assert out[key].sharding.is_equivalent_to(want.sharding, x.ndim)
        np.testing.assert_array_equal(np.asarray(out[key]), x)
    per_leaf = distributed.global_batch(tree, mesh, {"tokens": P(None, "data"), "pixels": P()})
    assert per_leaf["pixels"].sharding.is_fully_replicated
    assert per_leaf["tokens"].sharding.spec == P(None, "data", None)
    with pytest.raises(ValueError, match="has 3 entries for an array of rank 2"):
        distributed.global_batch(np.zeros((8, 2)), mesh, P("data", None, None))


def test_to_host_and_take_host_rows_single_process():
    mesh = _mesh()
    x = np.arange(32).reshape(8, 4)
    np.testing.assert_array_equal(distributed.to_host(distributed.global_batch(x, mesh, P("data"))), x)
    np.testing.assert_array_equal(distributed.take_host_rows({"a": x[None]}, mesh, 1)["a"], x[None])
    # One process holds every row, also where they do not divide over the shards (a native tower's 12 patch rows of
    # an eval batch on data=8: the eval on data=8 refused them before).
    rows = np.arange(12 * 3).reshape(12, 3)
    assert distributed.take_host_rows({"patches": rows}, mesh, 0)["patches"] is rows


@pytest.mark.parametrize("microbatches, hosts", [(1, 2), (2, 4)])
def test_local_synthetic_batches_tile_the_global_batch(microbatches, hosts):
    """The oracle is SyntheticBatches.batch_at: every host's share, stacked in host order, is exactly the global
    batch (token arrays, encoder rows and the global feature indices), with vision and audio encoders."""
    import gin

    from mllm_jax.data import SyntheticBatches
    from mllm_jax.train import loop

    gin.clear_config()
    try:
        cfg = loop.load_run_config(["configs/valm_tiny.gin"], [
            "DataConfig.batch_size = 8", "DataConfig.samples_per_row = 2", "DataConfig.seq_len = 128",
            "VisionConfig.image_size = 16", "DataConfig.mixture = {'image': 1.0, 'audio': 1.0, 'text': 1.0}"])
    finally:
        gin.clear_config()
    data = SyntheticBatches(cfg.model, cfg.data, microbatches=microbatches)
    rows = cfg.data.batch_size // microbatches // hosts
    full = data.batch_at(3)
    shares = [batching.local_synthetic_batch(data, 3, slice(h * rows, (h + 1) * rows)) for h in range(hosts)]
    leaves_full, treedef = jax.tree.flatten(full)
    stacked = [np.concatenate(xs, axis=1) for xs in zip(*(jax.tree.leaves(s) for s in shares))]
    assert jax.tree.structure(shares[0]) == treedef
    for want, got in zip(leaves_full, stacked):
        np.testing.assert_array_equal(got, want)
    assert (full["feature_index"]["audio"] >= 0).any() and (full["feature_index"]["vision"] >= 0).any()
    with pytest.raises(ValueError, match="must be a contiguous slice"):
        batching.local_synthetic_batch(data, 0, slice(0, 99))


@pytest.mark.parametrize("platforms", [None, "cpu"])
def test_cpu_devices_run_on_the_cpu_backend(platforms):
    """--cpu_devices=N (set_cpu_device_count) asks for CPU devices: the process runs on the CPU backend without
    probing the TPU / CUDA plugins installed beside it (JAX_PLATFORMS=cpu unless the user set it)."""
    import subprocess
    import sys

    from tests.subprocess_env import child_env

    env = child_env()
    env.pop("JAX_PLATFORMS")
    if platforms:
        env["JAX_PLATFORMS"] = platforms
    # jax imported first (as train.py's imports may do): it read JAX_PLATFORMS already, so its config is set too.
    code = ("import os, jax\nfrom mllm_jax.distributed import set_cpu_device_count\nset_cpu_device_count(3)\n"
            "print(os.environ['JAX_PLATFORMS'], jax.default_backend(), jax.device_count())")
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.split() == ["cpu", "cpu", "3"]
    assert "Unable to load CUDA" not in p.stderr and "TPU_WORKER_HOSTNAMES" not in p.stderr
