"""Two processes on localhost (4 fake CPU devices each, gloo) train the tiny recipe with the losses of one process
with 8 devices on the same (data=8) mesh, process 0 alone writes the metrics, and the checkpoint they write together
restores in a one-process run that then continues exactly like the uninterrupted one-process run.

The vision encoder is frozen and the two processes serve its features from a shared feature cache
(DataConfig.encoder_cache): each host encodes, stores and looks up the instances of its own rows on its own devices.
Step 3 is the second epoch (DataConfig.epoch_samples = 32: step 1's samples again), every instance a hit; the held-out
batch is cached under "eval:" keys; the one-process resumed run reads the entries the two processes wrote. The
reference one-process run is uncached.

Half the samples are text, so the hosts' rows hold different numbers of images: the two-process run balances them
over all 8 devices (DataConfig.encoder_balance = "balanced", the default: metadata exchanged between the hosts, the
cached features moved across them by an all_to_all), the one-process reference keeps them row-bound; losses and
gradient norms must agree."""

import os
import shutil
import socket
import subprocess
import sys

import gin
import numpy as np
import pytest

from mllm_jax.train import loop
from mllm_jax.train.metrics import read_metrics
from subprocess_env import child_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The multi-host entry point: train.py with --coordinator_address/--num_processes/--process_id.
ENTRY = [sys.executable, os.path.join(ROOT, "train.py")]

STEPS = 3
PARAMS = [
    "LLMConfig.n_layers = 2", "LLMConfig.d_model = 32", "LLMConfig.n_heads = 2", "LLMConfig.n_kv_heads = 2",
    "LLMConfig.d_ff = 64", "VisionConfig.n_layers = 1", "VisionConfig.d_model = 32", "VisionConfig.n_heads = 2",
    "VisionConfig.d_ff = 64", "VisionConfig.image_size = 16", "VisionConfig.patch_size = 4",
    "DataConfig.seq_len = 64", "DataConfig.samples_per_row = 1", "DataConfig.batch_size = 16", "DataConfig.eval_batches = 1",
    "OptimizerConfig.warmup_steps = 1", "TrainConfig.log_every = 1", "TrainConfig.eval_every = 0",
    "TrainConfig.progress_bar = False", f"TrainConfig.steps = {STEPS}", "TrainConfig.checkpoint_every = 2",
    "CheckpointConfig.keep = 10", "ParallelConfig.data = 8", 'DataConfig.mixture = {"image": 1.0, "text": 1.0}',
    "DataConfig.seed = 1",  # its steps hold more images on one host's devices than the other's
    'ModelConfig.trainable = {"encoders/vision": False}', "DataConfig.epoch_samples = 32",  # step 3 = step 1's samples
]
ROW_BOUND = ['DataConfig.encoder_balance = "row_bound"']
# Same program, same data; only the order in which gloo sums the cross-process reductions may differ.
RTOL = 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cache(directory: str) -> list[str]:
    return [f"DataConfig.encoder_cache = '{directory}'"]


def _run_two_processes(workdir: str, extra=()) -> list[str]:
    address = f"127.0.0.1:{_free_port()}"
    env = child_env()  # --cpu_devices sets the count per process
    args = ["--gin_file=configs/vlm_tiny.gin", *(f"--gin_param={p}" for p in [*PARAMS, *extra]),
            f"--workdir={workdir}", "--cpu_devices=4", f"--coordinator_address={address}", "--num_processes=2"]
    procs = [subprocess.Popen([*ENTRY, *args, f"--process_id={i}"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=540)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for i, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"process {i} exited with {p.returncode}:\n{out[-4000:]}"
    return outs


def _config(extra=()):
    gin.clear_config()
    try:
        return loop.load_run_config(["configs/vlm_tiny.gin"], PARAMS + list(extra))
    finally:
        gin.clear_config()


def _losses(rows):
    return {r["step"]: r["loss"] for r in rows}


def _images(cfg, step: int, split: str = "train") -> int:
    """The step's encoder instances (every host's), counted from the data stream's feature_index."""
    from mllm_jax.data import SyntheticBatches, TextCodec

    data = SyntheticBatches(cfg.model, cfg.data, split=split, codec=TextCodec())
    fi = data.batch_at(step)["feature_index"]["vision"]
    return len(np.unique(fi[fi >= 0] // cfg.model.features_per_instance("vision")))


def _check_instances_cross_hosts(cfg):
    """The oracle can fail: the balanced plan moves images from one host's devices to the other's in some step."""
    from mllm_jax.data import SyntheticBatches, TextCodec
    from mllm_jax.data.encoder_balance import encoder_shards, instance_cost
    from mllm_jax.parallel.instance_balance import assign, localize

    data = SyntheticBatches(cfg.model, cfg.data, codec=TextCodec())
    S, t = encoder_shards(cfg.parallel, "vision"), cfg.model.features_per_instance("vision")
    crossing = []
    for step in range(STEPS):
        batch = data.batch_at(step)
        fi = batch["feature_index"]["vision"][0]
        used = np.unique(fi[fi >= 0] // t)
        source = used // (batch["encoder_inputs"]["vision"].shape[1] // S)
        costs = np.full(len(used), instance_cost(cfg.model.encoders["vision"]))
        plan = localize(assign(costs, S), costs, source)
        crossing.append(int((source // 4 != plan.device // 4).sum()))
    assert any(crossing), crossing


@pytest.mark.slow
def test_two_processes_train_like_one_and_their_checkpoint_restores_in_one(tmp_path):
    two, cache = str(tmp_path / "two"), str(tmp_path / "cache")
    outs = _run_two_processes(two, _cache(cache))
    assert "done:" in outs[0] and "done:" in outs[1]

    one = str(tmp_path / "one")
    loop.run(_config(ROW_BOUND), one, log=lambda *_: None)  # this pytest process: 8 devices (conftest)
    want = _losses(read_metrics(one))
    _check_instances_cross_hosts(_config())
    rows = read_metrics(two)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # one row per step: process 0 alone writes
    got = _losses(rows)
    np.testing.assert_allclose([got[s] for s in want], [want[s] for s in want], rtol=RTOL)
    norms = lambda rs: [r["grad_norm"] for r in rs]  # noqa: E731  (the gradients, through their global norm)
    np.testing.assert_allclose(norms(rows), norms(read_metrics(one)), rtol=RTOL)
    assert rows[-1]["eval_loss"] == pytest.approx(read_metrics(one)[-1]["eval_loss"], rel=RTOL)
    # The hosts' cache counts, summed: steps 1-2 encode every instance once, step 3 (the second epoch) reads them all.
    n1, n2 = _images(_config(), 0), _images(_config(), 1)
    assert n1 > 0 and n2 > 0
    assert [r["encoder_cache"] for r in rows] == [{"corrupt": 0, "hits": h, "misses": m}
                                                  for h, m in ((0, n1), (0, n1 + n2), (n1, n1 + n2))]
    (folder,) = os.listdir(cache)
    entries = os.listdir(os.path.join(cache, folder))
    assert len([e for e in entries if e.startswith("train:")]) == n1 + n2
    # The held-out batch's (its own "eval:" keys), stored by both hosts at step 3's evaluation (the same keys: whole)
    assert len([e for e in entries if e.startswith("eval:")]) == _images(_config(), 0, "eval") > 0
    assert len(entries) == n1 + n2 + _images(_config(), 0, "eval")  # no temporary file left behind

    # One process resumes from the two-process checkpoint of step 2 and must continue as the one-process run did.
    resumed = str(tmp_path / "resumed")
    shutil.copytree(two, resumed)
    shutil.rmtree(os.path.join(resumed, "checkpoints", str(STEPS)))
    os.remove(os.path.join(resumed, "metrics.jsonl"))
    summary = loop.run(_config(ROW_BOUND + _cache(cache)), resumed, log=lambda *_: None)
    assert summary["start_step"] == 2 and summary["end_step"] == STEPS
    again = read_metrics(resumed)
    assert [r["step"] for r in again] == [STEPS]
    np.testing.assert_allclose(again[0]["loss"], want[STEPS], rtol=RTOL)
    assert again[0]["encoder_cache"] == {"corrupt": 0, "hits": n1, "misses": 0}  # the two processes' entries
    assert again[0]["eval_loss"] == pytest.approx(read_metrics(one)[-1]["eval_loss"], rel=RTOL)
    assert sorted(os.listdir(os.path.join(cache, folder))) == sorted(entries)
