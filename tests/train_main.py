"""Run train.py's main in this pytest process (its 8 fake devices), as the command line would, and read its metrics.

Cheaper than a subprocess per run (no interpreter start, no re-import of jax); --cpu_devices is left unset because
the device count of this process is fixed by conftest."""

from __future__ import annotations

import os
import sys

import gin

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import train  # noqa: E402  (defines the absl flags)
from mllm_jax.train.metrics import read_metrics  # noqa: E402

TINY = [
    "LLMConfig.n_layers = 2", "LLMConfig.d_model = 32", "LLMConfig.n_heads = 2", "LLMConfig.n_kv_heads = 2",
    "LLMConfig.d_ff = 64", "VisionConfig.n_layers = 1", "VisionConfig.d_model = 32", "VisionConfig.n_heads = 2",
    "VisionConfig.d_ff = 64", "VisionConfig.image_size = 16", "VisionConfig.patch_size = 4",
    "DataConfig.seq_len = 64", "DataConfig.samples_per_row = 1", "DataConfig.batch_size = 16",
    "DataConfig.eval_batches = 1", "OptimizerConfig.warmup_steps = 1", "OptimizerConfig.learning_rate = 3e-3",
    "TrainConfig.log_every = 1", "TrainConfig.eval_every = 0", "TrainConfig.progress_bar = False",
    "TrainConfig.eval_captions = 0",  # the caption decode compiles a prefill and a decode step: where a test reads it
    "CheckpointConfig.keep = 10", "CheckpointConfig.async_save = False",
]


def run_main(workdir: str, params, *, gin_file: str = "configs/vlm_tiny.gin", flags=()) -> list[dict]:
    """``python train.py --gin_file=... --gin_param=P... --workdir=...``; returns metrics.jsonl's rows."""
    assert main_status(params, gin_file=gin_file, flags=(f"--workdir={workdir}", *flags)) == 0
    return read_metrics(workdir)


def main_status(params, *, gin_file: str = "configs/vlm_tiny.gin", flags=()) -> int:
    """train.py's exit status for ``--gin_file=... --gin_param=P... flags``; --traceback: a refused input raises here
    with its traceback instead of becoming exit status 1."""
    argv = ["train.py", f"--gin_file={gin_file}", "--traceback", *flags, *(f"--gin_param={p}" for p in params)]
    train.FLAGS.unparse_flags()
    train.FLAGS(argv)
    gin.clear_config()
    try:
        return train.main(["train.py"])
    finally:
        gin.clear_config()
        train.FLAGS.unparse_flags()


def losses(rows) -> dict:
    return {r["step"]: r["loss"] for r in rows}
