"""One tiny trained run shared by the generation and export tests (not a test module): train.py's main in this
process for a few steps on all 8 fake devices (data=2 x fsdp=2 x context=2, so the checkpoint is a multi-device
training layout and the loop's caption eval decodes with a context-parallel prefill), with a CLIP-kind vision tower
that LLaVA in transformers can express. Made once per process."""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile

from train_main import TINY, run_main

STEPS = 6
# The CLIP tower LLaVA reads: class token (dropped from the features), pre-norm, no post-norm.
CLIP_TOWER = ['VisionConfig.kind = "clip"', "VisionConfig.class_token = True", "VisionConfig.pre_norm = True",
              "VisionConfig.post_norm = False", 'VisionConfig.activation = "quick_gelu"',
              "VisionConfig.drop_class_token = True"]
PARAMS = TINY + CLIP_TOWER + ["ParallelConfig.data = 2", "ParallelConfig.fsdp = 2", "ParallelConfig.context = 2",
                              "ContextConfig.block = 16", 'ContextConfig.mode = "zigzag"',
                              f"TrainConfig.steps = {STEPS}",
                              f"TrainConfig.checkpoint_every = {STEPS}", "DataConfig.eval_batches = 1",
                              "OptimizerConfig.learning_rate = 1e-2", "TrainConfig.eval_captions = 4"]


@functools.cache
def trained_workdir() -> str:
    workdir = tempfile.mkdtemp(prefix="mllm_jax_generate_run_")
    atexit.register(shutil.rmtree, workdir, ignore_errors=True)
    run_main(workdir, PARAMS)
    return workdir
