"""Run metrics: {workdir}/metrics.jsonl (one JSON object per logged step), TensorBoard events, a tqdm bar on a tty.

A resumed run (``initial_step`` > 0) first drops the rows of steps after ``initial_step``: it runs those steps again,
so metrics.jsonl keeps one row per step. (TensorBoard's event files are append-only: re-run steps appear twice
there, the later value wins in its plots.)"""

from __future__ import annotations

import json
import math
import os
import sys


class MetricsWriter:
    def __init__(self, workdir: str, *, total_steps: int, initial_step: int = 0, progress_bar: bool = True,
                 is_main_process: bool = True):
        self.active = is_main_process
        self.path = os.path.join(workdir, "metrics.jsonl")
        if self.active:
            _truncate_after(self.path, initial_step)
        self._file = open(self.path, "a") if self.active else None
        self._tb = None
        if self.active:
            self._tb = _summary_writer_class()(os.path.join(workdir, "tensorboard"))
        self._bar = None
        if self.active and progress_bar and sys.stdout.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=initial_step, dynamic_ncols=True)

    def write(self, step: int, values: dict) -> None:
        if not self.active:
            return
        row = {"step": int(step)}
        row.update({k: _jsonable(v) for k, v in values.items()})
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                self._tb.add_scalar(k, v, step)
        self._tb.flush()
        if self._bar is None:
            print(" ".join(f"{k}={_fmt(v)}" for k, v in row.items()), flush=True)

    def advance(self, step: int, values: dict | None = None) -> None:
        if self._bar is not None:
            self._bar.n = step
            if values:
                self._bar.set_postfix({k: _fmt(v) for k, v in values.items()}, refresh=False)
            self._bar.refresh()

    def close(self) -> None:
        if not self.active:
            return
        if self._bar is not None:
            self._bar.close()
        self._tb.close()
        self._file.close()


def _truncate_after(path: str, step: int) -> None:
    """Keep only the rows of steps <= ``step`` (a resumed run re-runs the later ones and writes them again: one row
    per step); a torn last line (a kill mid-write) goes too. Rewritten atomically."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.read().split("\n")
    keep = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
            keep.append(line)
    if len(keep) == len([x for x in lines if x.strip()]):
        return
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


def moe_fields(step_metrics: dict, moe_layers: tuple) -> dict:
    """The MoE rows of a train step's metrics (empty without MoE layers): moe_aux_loss, moe_z_loss (averaged over
    the MoE layers), moe_imbalance_max and moe_imbalance/layer_<i> per MoE layer i (max / mean tokens per expert:
    1 balanced, E / k when every token picks the same experts)."""
    if "moe_imbalance" not in step_metrics:
        return {}
    imb = [float(x) for x in list(step_metrics["moe_imbalance"])]
    if len(imb) != len(moe_layers):
        raise ValueError(f"moe_imbalance has {len(imb)} layers but the model has MoE layers {moe_layers}")
    row = {"moe_aux_loss": float(step_metrics["moe_aux_loss"]), "moe_z_loss": float(step_metrics["moe_z_loss"]),
           "moe_imbalance_max": max(imb)}
    row.update({f"moe_imbalance/layer_{i}": v for i, v in zip(moe_layers, imb)})
    return row


def _summary_writer_class():
    """tensorboardX.SummaryWriter, imported without torch where torch is not loaded yet: tensorboardX imports torch
    when it is installed (only to accept torch tensors, which we never pass), ~4 s of every train.py start."""
    if "tensorboardX" in sys.modules or "torch" in sys.modules:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    sys.modules["torch"] = None  # `import torch` raises ImportError: tensorboardX takes its numpy-only path
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


def _jsonable(v):
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep it readable
    return v


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def read_metrics(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]
