#!/usr/bin/env bash
# Cloud TPU VM: copy this checkout to every worker of a TPU VM, install it there if needed, and
# run a command on all workers at once.
#
#   launch/tpu_vm.sh TPU_NAME ZONE COMMAND [ARGS...]
#   launch/tpu_vm.sh my-v5p-64 us-east5-a scm-jax train --config imagenet512:size=xl \
#       --workdir /mnt/runs/in512_xl
#
# COMMAND runs in the copy's folder with its virtual environment first on PATH. Every worker
# runs it; scm_jax.distributed.initialize() finds the other workers through JAX's Cloud TPU
# detection (the TPU metadata server gives the worker count, this worker's id and worker 0's
# address), so no address or process id is passed. The workdir must be storage all workers
# share (a GCS bucket mounted with gcsfuse, Filestore): process 0 writes config.json, metrics and
# sample grids; every worker writes its shards of the orbax checkpoints.
#
# Environment:
#   SCM_JAX_PROJECT     gcloud project (default: gcloud's configured one)
#   SCM_JAX_REMOTE_DIR  folder on the workers (default scm-jax, under the login's home)
#   SCM_JAX_PYTHON      Python >= 3.11 on the workers (default python3)
#   SCM_JAX_SYNC=0      run without copying and installing (the workers are already set up)
# The workers install `jax[tpu]` (libtpu) beside the package the first time, and again whenever
# pyproject.toml changes. Ctrl-C stops gcloud locally; it does not reliably stop the remote
# processes: `launch/tpu_vm.sh NAME ZONE pkill -TERM -f scm-jax` makes them checkpoint and stop.
set -euo pipefail

die() {
    echo "launch/tpu_vm.sh: $*" >&2
    exit 2
}
[[ $# -ge 3 ]] || die "usage: launch/tpu_vm.sh TPU_NAME ZONE COMMAND [ARGS...]"
tpu=$1
zone=$2
shift 2
command -v gcloud >/dev/null || die "gcloud is not installed (https://cloud.google.com/sdk)"
cd "$(dirname "$0")/.."
remote=${SCM_JAX_REMOTE_DIR:-scm-jax}
python=${SCM_JAX_PYTHON:-python3}
gc=(gcloud compute tpus tpu-vm)
where=(--zone="$zone" ${SCM_JAX_PROJECT:+--project="$SCM_JAX_PROJECT"})

on_all() { # run a bash command line on every worker
    "${gc[@]}" ssh "$tpu" "${where[@]}" --worker=all --command="$1"
}

if [[ ${SCM_JAX_SYNC:-1} != "0" ]]; then
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    # Tracked and untracked-but-not-ignored files: what `git status` shows, without .venv/runs.
    git ls-files -z --cached --others --exclude-standard |
        tar --null -T - -czf "$tmp/scm-jax.tar.gz"
    echo "[tpu_vm] copying $(du -h "$tmp/scm-jax.tar.gz" | cut -f1) to every worker of $tpu" >&2
    "${gc[@]}" scp "$tmp/scm-jax.tar.gz" "$tpu:scm-jax.tar.gz" "${where[@]}" --worker=all
    stamp=$(cksum <pyproject.toml | cut -d' ' -f1)
    on_all "set -e
mkdir -p $(printf %q "$remote") && cd $(printf %q "$remote")
tar -xzf ~/scm-jax.tar.gz && rm ~/scm-jax.tar.gz
$(printf %q "$python") -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
  { echo \"scm-jax needs Python >= 3.11 on the TPU VM; set SCM_JAX_PYTHON\" >&2; exit 2; }
if [ ! -f .venv/.installed-tpu-$stamp ]; then
  $(printf %q "$python") -m venv .venv
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e . 'jax[tpu]>=0.10,<0.12'
  rm -f .venv/.installed-tpu-* && touch .venv/.installed-tpu-$stamp
fi"
fi

# The command, quoted for the remote shell; XLA/NCCL GPU flags do not apply on TPU.
cmd=$(printf '%q ' "$@")
echo "[tpu_vm] running on all workers of $tpu: $cmd" >&2
on_all "cd $(printf %q "$remote") && export PATH=\"\$PWD/.venv/bin:\$PATH\" PYTHONUNBUFFERED=1 && $cmd"
