"""The training loop end to end on tiny shapes: the loss falls, resume is exact, gradient accumulation is exact,
a non-finite loss stops the run leaving the last good checkpoint, and every layout error is raised before compile
naming its numbers. In-process runs use the 8 fake devices of conftest (data=8)."""

import json
import os

import gin
import numpy as np
import pytest

from mllm_jax.train import loop
from mllm_jax.train.metrics import read_metrics

TINY = [
    "LLMConfig.n_layers = 2", "LLMConfig.d_model = 32", "LLMConfig.n_heads = 2", "LLMConfig.n_kv_heads = 2",
    "LLMConfig.d_ff = 64", "VisionConfig.n_layers = 1", "VisionConfig.d_model = 32", "VisionConfig.n_heads = 2",
    "VisionConfig.d_ff = 64", "VisionConfig.image_size = 16", "VisionConfig.patch_size = 4",
    "DataConfig.seq_len = 64", "DataConfig.samples_per_row = 1", "DataConfig.batch_size = 16",
    "DataConfig.eval_batches = 1", "OptimizerConfig.warmup_steps = 1", "OptimizerConfig.learning_rate = 3e-3",
    "TrainConfig.log_every = 1", "TrainConfig.eval_every = 0", "TrainConfig.progress_bar = False",
    "TrainConfig.eval_captions = 0", "CheckpointConfig.keep = 10",
]


@pytest.fixture(autouse=True)
def _clean_gin():
    gin.clear_config()
    yield
    gin.clear_config()


def tiny_config(*extra):
    return loop.load_run_config(["configs/vlm_tiny.gin"], TINY + ["ParallelConfig.data = 8", *extra])


def _losses(workdir):
    return {r["step"]: r["loss"] for r in read_metrics(workdir) if "loss" in r}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    gin.clear_config()
    workdir = str(tmp_path_factory.mktemp("full"))
    summary = loop.run(tiny_config("TrainConfig.steps = 6", "TrainConfig.checkpoint_every = 3"), workdir,
                       log=lambda *_: None)
    gin.clear_config()
    return workdir, summary


def test_loss_falls_and_metrics_are_written(uninterrupted):
    workdir, summary = uninterrupted
    rows = read_metrics(workdir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "learning_rate", "grad_norm", "tokens_per_s", "step_time_s"):
        assert all(np.isfinite(r[key]) for r in rows), key
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.3
    assert "eval_loss" in rows[-1] and 0.0 <= rows[-1]["eval_accuracy"] <= 1.0
    # Warmup then cosine: the logged rate is the one the optimizer used at that step.
    assert rows[0]["learning_rate"] == 0.0 and rows[1]["learning_rate"] == pytest.approx(3e-3)
    assert os.path.exists(os.path.join(workdir, "run_config.json"))
    assert os.listdir(os.path.join(workdir, "tensorboard"))
    assert summary["end_step"] == 6


@pytest.mark.slow
def test_resume_equals_the_uninterrupted_run_exactly(uninterrupted, tmp_path):
    full_dir, _ = uninterrupted
    cfg = tiny_config("TrainConfig.steps = 6", "TrainConfig.checkpoint_every = 3")
    first = loop.run(cfg, str(tmp_path), stop_after_step=2, log=lambda *_: None)
    assert first["preempted"] and first["end_step"] == 2
    second = loop.run(cfg, str(tmp_path), log=lambda *_: None)
    assert second["start_step"] == 2 and second["end_step"] == 6
    assert _losses(str(tmp_path)) == _losses(full_dir)  # bitwise: same floats at every step


@pytest.mark.slow
def test_gradient_accumulation_is_exact(tmp_path):
    """Two microbatches give the one-batch update: same first-step grad norm, same second-step loss."""
    one = loop.run(tiny_config("TrainConfig.steps = 2"), str(tmp_path / "m1"), log=lambda *_: None)
    two = loop.run(tiny_config("TrainConfig.steps = 2", "ParallelConfig.microbatches = 2"), str(tmp_path / "m2"),
                   log=lambda *_: None)
    del one, two
    a, b = read_metrics(str(tmp_path / "m1")), read_metrics(str(tmp_path / "m2"))
    assert a[0]["loss"] == pytest.approx(b[0]["loss"], rel=1e-5)
    assert a[0]["grad_norm"] == pytest.approx(b[0]["grad_norm"], rel=1e-4)
    assert a[1]["loss"] == pytest.approx(b[1]["loss"], rel=1e-4)


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    cfg = tiny_config("TrainConfig.steps = 8", "TrainConfig.checkpoint_every = 1",
                      "OptimizerConfig.learning_rate = 1e30", "OptimizerConfig.grad_clip_norm = None")
    with pytest.raises(loop.NonFiniteLossError, match=r"loss is (nan|inf) at step (\d+).*last good checkpoint is "
                                                      r"step (\d+)") as info:
        loop.run(cfg, str(tmp_path), log=lambda *_: None)
    bad_step = int(info.value.args[0].split(" at step ")[1].split(";")[0])
    from mllm_jax.train.checkpoint import Checkpointer

    steps = Checkpointer(str(tmp_path), every=1, keep=10).all_steps()
    assert steps and max(steps) == bad_step - 1


def test_layout_errors_name_the_numbers():
    with pytest.raises(ValueError, match=r"data=4 x fsdp=1 x expert=1 x pipeline=1 x context=1 x tensor=1.*4 devices.*8 are"):
        loop.validate(tiny_config("ParallelConfig.data = 4"), 8)
    with pytest.raises(ValueError, match=r"LLMConfig.n_heads=2 is not divisible by ParallelConfig.tensor=4"):
        loop.validate(tiny_config("ParallelConfig.data = 2", "ParallelConfig.tensor = 4"), 8)
    with pytest.raises(ValueError, match=r"batch_size=16 is not divisible by data x fsdp x microbatches = "
                                         r"8 x 1 x 4 = 32"):
        loop.validate(tiny_config("ParallelConfig.microbatches = 4"), 8)
    with pytest.raises(ValueError, match=r"LLMConfig.n_layers=2 is fewer than ParallelConfig.pipeline=4"):
        loop.validate(tiny_config("ParallelConfig.data = 2", "ParallelConfig.pipeline = 4"), 8)
    loop.validate(tiny_config("ParallelConfig.data = 2", "ParallelConfig.pipeline = 2",  # ring inside stages: valid
                              "ParallelConfig.context = 2", 'ContextConfig.attention = "ring"'), 8)
    with pytest.raises(ValueError, match=r"ContextConfig.mode must be one of .*got 'diagonal'"):
        loop.validate(tiny_config("ParallelConfig.data = 4", "ParallelConfig.context = 2",
                                  'ContextConfig.mode = "diagonal"'), 8)
    with pytest.raises(ValueError, match=r"no_such_field"):
        loop.load_run_config(["configs/vlm_tiny.gin"], ["TrainConfig.no_such_field = 3"])


def test_incompatible_checkpoint_in_workdir_is_refused(uninterrupted, tmp_path):
    import shutil

    full_dir, _ = uninterrupted
    shutil.copytree(os.path.join(full_dir, "checkpoints"), os.path.join(tmp_path, "checkpoints"))
    cfg = tiny_config("TrainConfig.steps = 8", "LLMConfig.d_ff = 96")
    with pytest.raises(ValueError, match=r"incompatible model.*llm.d_ff: checkpoint 64 vs now 96"):
        loop.run(cfg, str(tmp_path), log=lambda *_: None)


def test_dry_run_builds_full_size_recipes_abstractly():
    """Oracle: the published parameter counts of Llama-2-7B (6,738,415,616) and Mistral-7B (7,241,732,096)."""
    from mllm_jax.train import dry_run

    lines = []
    cfg = loop.load_run_config(["configs/llava_7b.gin"], ["ParallelConfig.fsdp = 8"])
    out = dry_run.report(cfg, print_fn=lines.append)
    assert any("llm" in line and "6,738,415,616" in line for line in lines)
    assert 300_000_000 < out["params_frozen"] < 310_000_000  # the frozen CLIP ViT-L/14 tower
    assert out["mesh"]["fsdp"] == 8
    # FSDP over 8 devices: a device holds about an eighth of the parameters' bytes (float32).
    total_bytes = (out["params_trainable"] + out["params_frozen"]) * 4
    assert out["per_device_gib"]["params"] * 2**30 == pytest.approx(total_bytes / 8, rel=0.05)
    gin.clear_config()
    # Pipeline over 4 devices: each stores a quarter of the 32 decoder layers (Llama-2-7B: 4 d^2 + 3 d d_ff + 2 d
    # parameters each), and everything else whole.
    cfg = loop.load_run_config(["configs/llava_7b.gin"], ["ParallelConfig.data = 2", "ParallelConfig.pipeline = 4",
                                                          "ParallelConfig.microbatches = 4"])
    out = dry_run.report(cfg, print_fn=lines.append)
    layer_params = 32 * (4 * 4096**2 + 3 * 4096 * 11008 + 2 * 4096)
    per_device = (out["params_trainable"] + out["params_frozen"] - layer_params * 3 / 4) * 4
    assert out["per_device_gib"]["params"] * 2**30 == pytest.approx(per_device, rel=1e-6)
    gin.clear_config()
    cfg = loop.load_run_config(["configs/valm_s.gin"], ["ParallelConfig.fsdp = 8", "ParallelConfig.microbatches = 8"])
    lines.clear()
    dry_run.report(cfg, print_fn=lines.append)
    assert any("llm" in line and "7,241,732,096" in line for line in lines)


def test_negative_eval_captions_is_refused_naming_the_value():
    loop.validate(tiny_config("TrainConfig.eval_captions = 0"), 8)  # 0 turns the captioning off
    with pytest.raises(ValueError, match=r"TrainConfig.eval_captions must be >= 0 .*got -1"):
        loop.validate(tiny_config("TrainConfig.eval_captions = -1"), 8)


def test_dry_run_target_flag_reaches_the_plan_and_bad_pairs_are_refused(tmp_path, monkeypatch):
    from absl import app

    from mllm_jax.train import dry_run, targets
    from train_main import main_status

    pipeline = ["ParallelConfig.data = 4", "ParallelConfig.pipeline = 2", "ParallelConfig.microbatches = 2"]
    seen = []
    monkeypatch.setattr(dry_run, "report", lambda cfg, target=None, **_: seen.append(target) or {})
    for flags in (["--target=tpu:v5e:2x2"], ["--target=cpu"], []):
        assert main_status(pipeline, flags=["--dry_run", *flags]) == 0
    assert seen == [targets.parse("tpu:v5e:2x2"), "cpu", None]
    monkeypatch.undo()
    with pytest.raises(app.UsageError, match="--target goes with --compile_only .* or --dry_run"):
        main_status([], flags=[f"--workdir={tmp_path}", "--target=tpu:v5e:2x2"])
    # The GPU back end gives no cost analysis without a device: the plan is on the analytic costs, the microbatch
    # count priced on the GPU's figures, and the run says so (layer_costs itself refuses a GPU target).
    printed = []
    out = dry_run.report(loop.load_run_config(["configs/vlm_tiny.gin"], pipeline), print_fn=printed.append,
                         target=targets.parse("gpu:a100:1x8"))
    assert "per-layer costs analytic" in "\n".join(printed) and "priced on a100's figures" in printed[0], printed[:2]
    assert out["pipeline_plan"].runtime is not None
    from mllm_jax.train.layer_costs import compiled_layer_costs

    with pytest.raises(ValueError, match=r"TPU targets or the host.*got target gpu:h100:1x8"):
        compiled_layer_costs(loop.load_run_config(["configs/vlm_tiny.gin"], pipeline).model, text_tokens=64,
                             microbatch_size=1, target=targets.parse("gpu:h100:1x8"))


@pytest.mark.parametrize("binding, match", [
    ("DataConfig.batch_size = 0", r"DataConfig.batch_size must be an integer >= 1; got 0"),
    ("DataConfig.seq_len = -8", r"DataConfig.seq_len must be an integer >= 1; got -8"),
    ("DataConfig.eval_batches = -1", r"DataConfig.eval_batches must be an integer >= 0; got -1"),
    ("OptimizerConfig.learning_rate = -1e-3", r"learning_rate must be a finite number >= 0; got -0.001"),
    ("OptimizerConfig.b2 = 1.0", r"OptimizerConfig.b2 must be a finite number >= 0 and < 1; got 1.0"),
    ("OptimizerConfig.eps = 0.0", r"OptimizerConfig.eps must be a finite number > 0; got 0.0"),
    ("OptimizerConfig.grad_clip_norm = 0.0", r"grad_clip_norm must be a finite number > 0 or None; got 0.0"),
    ("OptimizerConfig.warmup_steps = 2.5", r"OptimizerConfig.warmup_steps must be an integer >= 0; got 2.5"),
])
def test_data_and_optimizer_values_out_of_range_are_refused_naming_them(binding, match):
    # (A batch of 0 rows failed deep in numpy; a negative learning rate trained uphill without a word.)
    with pytest.raises(ValueError, match=match):
        tiny_config(binding)
