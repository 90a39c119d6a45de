#!/usr/bin/env bash
# Training on a Cloud TPU pod slice (a multi-host TPU VM): copy this checkout to every worker, install, and run
# train.py on all workers at once with the same flags. JAX finds the workers and the coordinator from the TPU VM
# metadata (mllm_jax.distributed.initialize auto-detects the TPU), so no coordinator flags are passed.
#
#   scripts/tpu_pod_train.sh TPU_NAME ZONE --gin_file=configs/vlm_small.gin --workdir=gs://BUCKET/runs/vlm_small
#
# --workdir must be storage every worker sees (a gs:// bucket or a shared filesystem). Environment knobs:
#   PROJECT   the GCP project (default: gcloud's)      REMOTE_DIR  where the code goes on the workers (mllm_jax)
#   SKIP_SYNC=1 / SKIP_INSTALL=1   skip copying the code / installing requirements (reruns)
#   GCLOUD    the gcloud binary (default gcloud)
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: $0 TPU_NAME ZONE [train.py flags...]" >&2
  exit 2
fi
tpu="$1" zone="$2"
shift 2
gcloud_bin="${GCLOUD:-gcloud}"
remote_dir="${REMOTE_DIR:-mllm_jax}"
common=(--zone="$zone" --worker=all)
if [[ -n "${PROJECT:-}" ]]; then
  common+=(--project="$PROJECT")
fi
repo_root="$(cd "$(dirname "$0")/.." && pwd)"

if [[ -z "${SKIP_SYNC:-}" ]]; then
  # A clean copy of the tracked files (no runs/, no virtualenvs).
  bundle="$(mktemp -d)/mllm_jax.tar.gz"
  git -C "$repo_root" archive --format=tar.gz -o "$bundle" HEAD
  "$gcloud_bin" compute tpus tpu-vm scp "$bundle" "$tpu":mllm_jax.tar.gz "${common[@]}"
  "$gcloud_bin" compute tpus tpu-vm ssh "$tpu" "${common[@]}" \
    --command="rm -rf $remote_dir && mkdir -p $remote_dir && tar -xzf mllm_jax.tar.gz -C $remote_dir"
fi
if [[ -z "${SKIP_INSTALL:-}" ]]; then
  "$gcloud_bin" compute tpus tpu-vm ssh "$tpu" "${common[@]}" \
    --command="cd $remote_dir && python3 -m pip install -q -r requirements.txt 'jax[tpu]'"
fi
# printf %q keeps every flag one word through the remote shell.
flags="$(printf '%q ' "$@")"
"$gcloud_bin" compute tpus tpu-vm ssh "$tpu" "${common[@]}" --command="cd $remote_dir && python3 train.py $flags"
