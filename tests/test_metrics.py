"""mllm_jax.train.metrics: metrics.jsonl rows and TensorBoard scalars hold what was written, and the writer starts
without importing torch (tensorboardX would, costing seconds of every train.py start)."""

import glob
import json
import os
import struct
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WRITE = """
import sys
sys.path.insert(0, {root!r})
from mllm_jax.train.metrics import MetricsWriter
w = MetricsWriter({workdir!r}, total_steps=2, progress_bar=False)
w.write(1, {{"loss": 2.5, "learning_rate": 0.001}})
w.write(2, {{"loss": 1.25, "eval_accuracy": 0.75}})
w.close()
print("torch" in sys.modules)
"""


def _events(path):
    """(tag, step, value) of every scalar in a TensorBoard event file (TFRecord framing: length, crc, data, crc)."""
    from tensorboardX.proto import event_pb2

    out, data = [], open(path, "rb").read()
    pos = 0
    while pos < len(data):
        (n,) = struct.unpack("<Q", data[pos:pos + 8])
        event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
        pos += 12 + n + 4
        out += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
    return out


def test_rows_and_scalars_round_trip_without_importing_torch(tmp_path):
    proc = subprocess.run([sys.executable, "-c", WRITE.format(root=ROOT, workdir=str(tmp_path))],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "False"  # tensorboardX ran without torch
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert rows == [{"step": 1, "loss": 2.5, "learning_rate": 0.001}, {"step": 2, "loss": 1.25, "eval_accuracy": 0.75}]
    (events,) = glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*"))
    want = [("eval_accuracy", 2, 0.75), ("learning_rate", 1, _f32(0.001)), ("loss", 1, 2.5), ("loss", 2, 1.25)]
    assert sorted(_events(events)) == want  # TensorBoard stores float32


def _f32(x):
    return struct.unpack("<f", struct.pack("<f", x))[0]
