"""TrainConfig.init_from / init_modules: a fresh run takes the selected parameters of an earlier run's checkpoint
(exactly, into this run's shardings), keeps the rest freshly initialised, trains the frozen recipe's projector only,
names every mismatch before training, and never overrides a resume of its own workdir."""

import dataclasses
import os
import subprocess
import sys

import gin
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from mllm_jax.build import abstract_model
from mllm_jax.train import init_from, loop
from mllm_jax.train.checkpoint import Checkpointer, _path_str
from mllm_jax.train.optimizer import make_optimizer
from test_train import TINY
from train_main import run_main
from subprocess_env import child_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGE1 = ['TrainConfig.init_modules = ("encoders", "llm")']


@pytest.fixture(autouse=True)
def _clean_gin():
    gin.clear_config()
    yield
    gin.clear_config()


def _config(recipe="configs/vlm_tiny_frozen.gin", *extra):
    # eval_batches 0: no evaluation, so a run compiles its train step only
    return loop.load_run_config([recipe], TINY + ["ParallelConfig.data = 8", "DataConfig.eval_batches = 0", *extra])


def _saved_params(step_dir) -> dict:
    """path -> numpy array of a checkpoint's state/model subtree."""
    tree = ocp.PyTreeCheckpointer().restore(os.path.join(step_dir, "state"))
    return {_path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree["model"])[0]}


def _params(model) -> dict:
    pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return {_path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(pure)[0]}


def _built(cfg):
    mesh = loop.build_mesh(cfg.parallel)
    with jax.set_mesh(mesh):
        return loop.create_model(cfg, mesh), mesh


def _is_stage1(path):
    return path.startswith(("encoders/", "llm/"))


@pytest.fixture(scope="module")
def _one_build(tmp_path_factory):
    """One stage-1 model build (the slow part, a compile) serves both ends. Its parameters moved off their init
    (x * 1.1 + 1e-3: zero biases differ too, and the frozen LLM still passes gradients to the projector) are saved as
    the loop saves an all-trainable vlm_tiny run (model and optimizer state) at step 1: the source. Then the fresh
    init is put back and initialised from that source."""
    gin.clear_config()
    workdir = str(tmp_path_factory.mktemp("source"))
    cfg = _config("configs/vlm_tiny_frozen.gin", f"TrainConfig.init_from = '{workdir}'", *STAGE1)
    gin.clear_config()
    model, mesh = _built(cfg)
    lines = []
    with jax.set_mesh(mesh):
        params = nnx.state(model, nnx.Param)
        fresh_arrays = nnx.to_pure_dict(params)
        nnx.replace_by_pure_dict(params, jax.tree.map(lambda x: x * 1.1 + 1e-3, fresh_arrays))
        nnx.update(model, params)
        all_trainable = loop.trainable_filter(dataclasses.replace(cfg.model, trainable={}))
        optimizer = loop.make_nnx_optimizer(model, make_optimizer(cfg.optimizer, cfg.train.steps), all_trainable)
        ckpt = Checkpointer(workdir, every=1, keep=1, async_save=False)
        ckpt.save(1, loop._checkpoint_tree(model, optimizer), {"index": 1}, cfg.model)
        ckpt.close()
        nnx.replace_by_pure_dict(params, fresh_arrays)
        nnx.update(model, params)
        fresh = _params(model)
        info = init_from.maybe_init(model, cfg, resuming=False, log=lines.append)
    return workdir, _saved_params(os.path.join(workdir, "checkpoints", "1")), fresh, _params(model), info, lines


@pytest.fixture(scope="module")
def source(_one_build):
    """(workdir, path -> saved array) of the earlier run."""
    return _one_build[:2]


@pytest.fixture(scope="module")
def stage1(_one_build):
    """A fresh stage-1 model's parameters before and after init_from from ``source``, the summary, the log."""
    return _one_build[2:]


def test_selected_parameters_come_from_the_source_the_rest_stay_fresh(source, stage1):
    _, want = source
    fresh, got, info, lines = stage1
    assert info["step"] == 1 and info["fresh_modules"] == ["projectors/vision"]
    assert len(lines) == 1 and lines[0].startswith("initialised ") and "(encoders, llm)" in lines[0]
    assert lines[0].endswith("step 1; fresh: projectors/vision")
    differs = []
    for path, x in got.items():
        if _is_stage1(path):
            np.testing.assert_array_equal(x, want[path], err_msg=path)
        else:
            np.testing.assert_array_equal(x, fresh[path], err_msg=path)
            differs.append(not np.array_equal(x, want[path]))
    assert differs and all(differs)  # the projector stayed the fresh init, not the source's
    assert any(map(_is_stage1, got))


STAGE1_RUN = ["TrainConfig.steps = 2", *STAGE1]


@pytest.fixture(scope="module")
def trained(source, tmp_path_factory):
    """The frozen recipe initialised from ``source``, 2 steps (the second at the full learning rate)."""
    gin.clear_config()
    workdir, lines = str(tmp_path_factory.mktemp("stage1")), []
    params = [f"TrainConfig.init_from = '{source[0]}'", *STAGE1_RUN]
    summary = loop.run(_config("configs/vlm_tiny_frozen.gin", *params), workdir, log=lines.append)
    gin.clear_config()
    return workdir, params, summary, lines


def test_frozen_recipe_from_the_source_trains_only_the_projector(source, stage1, trained):
    _, want = source
    fresh = stage1[0]
    workdir, _, summary, lines = trained
    assert summary["start_step"] == 0 and summary["end_step"] == 2  # a fresh start: step 0, its own optimizer
    assert sum(line.startswith("initialised ") for line in lines) == 1
    got = _saved_params(os.path.join(workdir, "checkpoints", "2"))
    moved = []
    for path, x in got.items():
        if _is_stage1(path):  # frozen: bit-identical to the source after training
            np.testing.assert_array_equal(x, want[path], err_msg=path)
        elif path.startswith("projectors/"):
            moved.append(not np.array_equal(x, fresh[path]))
    assert moved and all(moved)


def test_a_resume_wins_over_init_from():
    cfg = _config("configs/vlm_tiny_frozen.gin", "TrainConfig.init_from = '/not/read/when/resuming'")
    model, mesh = _abstract()
    lines = []
    with jax.set_mesh(mesh):
        assert init_from.maybe_init(model, cfg, resuming=True, log=lines.append) is None
    assert lines == ["TrainConfig.init_from='/not/read/when/resuming' ignored: resuming from this workdir's own "
                     "checkpoint"]


@pytest.mark.slow
def test_rerunning_the_same_train_py_command_resumes(trained, capsys):
    """The same command again, through train.py's gin flags: the workdir's own checkpoint wins."""
    workdir, params, _, _ = trained
    capsys.readouterr()
    run_main(workdir, TINY + ["ParallelConfig.data = 8", "DataConfig.eval_batches = 0", *params],
             gin_file="configs/vlm_tiny_frozen.gin")
    out = capsys.readouterr().out
    assert "resumed from step 2" in out and "'start_step': 2" in out
    assert "initialised " not in out and out.count("init_from=") == 1 and "ignored" in out


def _abstract(*extra):
    """An abstract stage-1 model (shapes, dtypes, shardings; nothing allocated): enough for every error check."""
    gin.clear_config()
    cfg = _config("configs/vlm_tiny_frozen.gin", *extra)
    mesh = loop.build_mesh(cfg.parallel)
    return abstract_model(cfg.model, mesh, cfg.parallel), mesh


def test_errors_name_the_path_the_prefix_and_the_parameter(source, tmp_path):
    workdir, _ = source
    model, mesh = _abstract()
    with jax.set_mesh(mesh):
        missing = str(tmp_path / "nowhere")
        with pytest.raises(ValueError, match=rf"init_from='{missing}': no such directory"):
            init_from.load(model, missing)
        with pytest.raises(ValueError, match=r"init_from='': no such directory"):
            init_from.load(model, "")
        os.makedirs(tmp_path / "empty")
        with pytest.raises(ValueError, match=r"empty'.*holds no checkpoints/"):
            init_from.load(model, str(tmp_path / "empty"))
        with pytest.raises(ValueError, match=r"checkpoints/7'.*no such directory"):
            init_from.load(model, os.path.join(workdir, "checkpoints", "7"))
        with pytest.raises(ValueError, match=r"init_modules \['llm/nothing'\] match no parameter"):
            init_from.load(model, workdir, ("llm", "llm/nothing"))
    # Another LLM depth, then width: the stacked layer arrays, then the embedding, differ in shape.
    deeper, mesh = _abstract("LLMConfig.n_layers = 3")
    with jax.set_mesh(mesh), pytest.raises(
            ValueError, match=r"llm/layers/\S+: source shape \(2, .*\) vs model \(3, .*\)"):
        init_from.load(deeper, workdir, ("llm",))
    wide, mesh = _abstract("LLMConfig.d_model = 64")
    with jax.set_mesh(mesh), pytest.raises(ValueError, match=r"llm/embed/\S+: source shape \(128, 32\) vs model "
                                                             r"\(128, 64\)"):
        init_from.load(wide, workdir, ("llm",))
    # A parameter the source lacks: the source has no audio encoder.
    audio, mesh = _abstract('ModelConfig.encoders = {"vision": @VisionConfig(), "audio": @AudioConfig()}',
                            'ModelConfig.projectors = {"vision": @ProjectorConfig(), "audio": @ProjectorConfig()}',
                            'ModelConfig.placeholder_ids = {"vision": 3, "audio": 4}')
    with jax.set_mesh(mesh), pytest.raises(ValueError, match=r"encoders/audio/\S+: missing in the source"):
        init_from.load(audio, workdir, ("encoders",))


def test_gin_bindings_and_the_frozen_random_llm_warning():
    cfg = _config("configs/vlm_tiny_frozen.gin", 'TrainConfig.init_modules = ("encoders/vision",)',
                  'TrainConfig.init_from = "runs/vlm_tiny"')
    assert cfg.train.init_modules == ("encoders/vision",) and cfg.train.init_from == "runs/vlm_tiny"
    gin.clear_config()
    cfg = _config()
    assert cfg.train.init_modules == ("encoders", "llm")  # the recipe's own binding
    model, mesh = _abstract()
    lines = []
    with jax.set_mesh(mesh):
        assert init_from.maybe_init(model, cfg, resuming=False, log=lines.append) is None
    assert len(lines) == 1 and "frozen and randomly initialised" in lines[0] and "init_from" in lines[0]


@pytest.mark.slow
def test_one_device_checkpoint_initialises_eight_devices_and_back(source, tmp_path):
    """Written with --cpu_devices=1, loaded into data=8 here; and the 8-device source loaded by a 1-device run."""
    env = child_env()  # train.py sets the device count itself
    params = TINY + ["ParallelConfig.data = 1", "DataConfig.eval_batches = 0", "TrainConfig.steps = 1"]

    def train(workdir, recipe, *extra):
        cmd = [sys.executable, os.path.join(ROOT, "train.py"), f"--gin_file={recipe}", f"--workdir={workdir}",
               "--cpu_devices=1", *(f"--gin_param={p}" for p in params + list(extra))]
        out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        return out.stdout

    one = str(tmp_path / "one")
    train(one, "configs/vlm_tiny.gin", "TrainConfig.seed = 2")
    want = _saved_params(os.path.join(one, "checkpoints", "1"))
    cfg = _config("configs/vlm_tiny_frozen.gin", f"TrainConfig.init_from = '{one}/checkpoints/1'", *STAGE1)
    model, mesh = _built(cfg)
    with jax.set_mesh(mesh):
        init_from.maybe_init(model, cfg, resuming=False, log=lambda *_: None)
    got = _params(model)
    assert jax.tree.leaves(nnx.state(model, nnx.Param))[0].sharding.num_devices == 8
    for path in filter(_is_stage1, got):
        np.testing.assert_array_equal(got[path], want[path], err_msg=path)
    # 8 -> 1: the frozen parameters a one-device stage-1 run saves are the 8-device source's.
    src, src_params = source
    stage1 = str(tmp_path / "stage1")
    assert "initialised " in train(stage1, "configs/vlm_tiny_frozen.gin", f"TrainConfig.init_from = '{src}'",
                                   *STAGE1)
    saved = _saved_params(os.path.join(stage1, "checkpoints", "1"))
    for path in filter(_is_stage1, saved):
        np.testing.assert_array_equal(saved[path], src_params[path], err_msg=path)
