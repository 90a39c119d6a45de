"""The cluster launch scripts, run against stand-ins for srun/scontrol and gcloud that record what they were asked
to do: every task/worker must get train.py with the same flags and its own process id, the coordinator on the first
node, and the TPU command must keep each flag one word through the remote shell."""

import json
import os
import shlex
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write_exe(path, text):
    path.write_text(text)
    path.chmod(0o755)
    return str(path)


def test_slurm_script_starts_one_train_per_task_with_the_first_node_as_coordinator(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # srun stand-in: runs the command once per task with SLURM's per-task variables (3 nodes, 1 task each).
    _write_exe(bin_dir / "srun", "#!/usr/bin/env bash\nwhile [[ $1 == --* ]]; do shift; done\n"
               "for i in 0 1 2; do SLURM_PROCID=$i SLURM_NTASKS=3 \"$@\" & done; wait\n")
    _write_exe(bin_dir / "scontrol", "#!/usr/bin/env bash\nprintf 'gpu-node-07\\ngpu-node-08\\ngpu-node-09\\n'\n")
    fake_train = _write_exe(tmp_path / "fake_train.py", "import json, os, sys\n"
                            f"open(os.path.join({str(tmp_path)!r}, 'args_' + os.environ['SLURM_PROCID']), 'w')"
                            ".write(json.dumps(sys.argv[1:]))\n")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "gpu-node-[07-09]",
           "SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": "3", "SLURM_SUBMIT_DIR": ROOT,
           "TRAIN_PY": fake_train, "PYTHON": sys.executable}
    flags = ["--gin_file=configs/vlm_small.gin", "--workdir=/shared/runs/a b", "--gin_param=TrainConfig.steps=5"]
    subprocess.run(["bash", os.path.join(ROOT, "scripts", "slurm_train.sbatch"), *flags], env=env, check=True,
                   capture_output=True, text=True)
    port = 12000 + 4242 % 20000
    for i in range(3):
        args = json.loads((tmp_path / f"args_{i}").read_text())
        assert args == [f"--coordinator_address=gpu-node-07:{port}", "--num_processes=3", f"--process_id={i}",
                        *flags]


def test_tpu_script_runs_the_same_train_command_on_all_workers(tmp_path):
    log = tmp_path / "gcloud.log"
    gcloud = _write_exe(tmp_path / "gcloud", "#!/usr/bin/env bash\n"
                        f"printf '%s\\n' \"$*\" >> {shlex.quote(str(log))}\n")
    env = {**os.environ, "GCLOUD": gcloud, "PROJECT": "my-proj"}
    flags = ["--gin_file=configs/vlm_small.gin", "--workdir=gs://bucket/runs/x", "--gin_param=DataConfig.mixture="
             "{'image': 1.0}"]
    subprocess.run(["bash", os.path.join(ROOT, "scripts", "tpu_pod_train.sh"), "my-tpu", "us-central2-b", *flags],
                   env=env, check=True, capture_output=True, text=True)
    calls = log.read_text().splitlines()
    assert [c.split()[:4] for c in calls] == [["compute", "tpus", "tpu-vm", "scp"]] + [
        ["compute", "tpus", "tpu-vm", "ssh"]] * 3
    assert all("--worker=all" in c and "--zone=us-central2-b" in c and "--project=my-proj" in c for c in calls)
    train_cmd = calls[-1].split("--command=", 1)[1]
    assert shlex.split(train_cmd) == ["cd", "mllm_jax", "&&", "python3", "train.py", *flags]
    assert subprocess.run(["bash", os.path.join(ROOT, "scripts", "tpu_pod_train.sh")], capture_output=True,
                          text=True).returncode == 2  # usage
