#!/usr/bin/env bash
# One jaxpoison study over every host of a Cloud TPU VM slice (v4-32, v5litepod-32, ...): create the slice or
# reuse it, copy this project to every worker, run launch/setup.sh + jax[tpu] there, then start the same `run`
# command on all workers at once. jax finds its place from the VM metadata (no jaxpoison flags); worker 0
# runs the coordinator and is the one writer.
#
#   TPU_NAME=jp-pod ZONE=us-central2-b ACCELERATOR=v4-32 RUN_DIR=/mnt/shared/runs/paper \
#     MOUNT_CMD='sudo mkdir -p /mnt/shared && sudo mount -t nfs 10.0.0.2:/share /mnt/shared' \
#     bash launch/tpu_pod.sh configs/rationale_paper.py [run args]
#
# Environment: TPU_NAME, ZONE (required); ACCELERATOR (default v4-32) and VERSION (default
# tpu-ubuntu2204-base) for a new slice; PROJECT (default: gcloud's); SPOT=1 for a spot slice; RUN_DIR (required)
# must be one folder every worker mounts at the same path (Filestore/NFS, or a GCS bucket through gcsfuse):
# every worker writes its checkpoint shards there and worker 0 everything else; the run refuses a folder that
# some worker does not see. MOUNT_CMD, if set, runs on every worker first to mount it. REMOTE_DIR (default
# jaxpoison, under each worker's home) holds the copy. DETACH=1 starts the study in the background (nohup) and
# returns; logs are ~/jaxpoison-run.log on each worker. Rerunning the script resumes the study.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${TPU_NAME:?set TPU_NAME (the slice name)}" "${ZONE:?set ZONE, e.g. us-central2-b}"
: "${RUN_DIR:?set RUN_DIR to a folder every worker mounts at the same path}"
CONFIG=${1:?usage: TPU_NAME=... ZONE=... RUN_DIR=... bash launch/tpu_pod.sh CONFIG [run args]}
shift
ACCELERATOR=${ACCELERATOR:-v4-32}
VERSION=${VERSION:-tpu-ubuntu2204-base}
REMOTE_DIR=${REMOTE_DIR:-jaxpoison}
JAX_VERSION=$(sed -n 's/^jax==\([0-9.]*\).*/\1/p' requirements.txt)
tpu=(gcloud compute tpus tpu-vm)
where=(--zone="$ZONE")
if [ -n "${PROJECT:-}" ]; then where+=(--project="$PROJECT"); fi
on_all() { "${tpu[@]}" ssh "$TPU_NAME" "${where[@]}" --worker=all --command="$1"; }
q() { printf '%q ' "$@"; }

# 1. the slice
if "${tpu[@]}" describe "$TPU_NAME" "${where[@]}" > /dev/null 2>&1; then
  echo "reusing TPU slice $TPU_NAME in $ZONE"
else
  echo "creating TPU slice $TPU_NAME ($ACCELERATOR, $VERSION) in $ZONE"
  "${tpu[@]}" create "$TPU_NAME" "${where[@]}" --accelerator-type="$ACCELERATOR" --version="$VERSION" \
    ${SPOT:+--spot}
fi

# 2. the project (tracked and new, not ignored, files: what `git status` would commit) on every worker
tarball=$(mktemp -t jaxpoison-XXXXXX.tgz)
trap 'rm -f "$tarball"' EXIT
git ls-files -z --cached --others --exclude-standard | tar --null -czf "$tarball" -T -
"${tpu[@]}" scp "$tarball" "$TPU_NAME:jaxpoison.tgz" "${where[@]}" --worker=all
on_all "mkdir -p $(q "$REMOTE_DIR") && tar -xzf jaxpoison.tgz -C $(q "$REMOTE_DIR") && rm jaxpoison.tgz"

# 3. setup on every worker (idempotent), the TPU build of jax at the pinned version, the shared folder
on_all "cd $(q "$REMOTE_DIR") && bash launch/setup.sh && .venv/bin/pip install -q $(q "jax[tpu]==$JAX_VERSION")"
if [ -n "${MOUNT_CMD:-}" ]; then on_all "$MOUNT_CMD"; fi

# 4. the study, on all workers at once (each is one jax process; they meet at worker 0)
run="cd $(q "$REMOTE_DIR") && .venv/bin/python -m jaxpoison run $(q "$CONFIG" --out "$RUN_DIR" "$@")"
echo "starting on every worker of $TPU_NAME: $run"
if [ "${DETACH:-0}" = 1 ]; then
  on_all "nohup bash -c $(q "$run") > ~/jaxpoison-run.log 2>&1 < /dev/null &"
  echo "started in the background; follow worker 0 with:"
  echo "  ${tpu[*]} ssh $TPU_NAME ${where[*]} --worker=0 --command='tail -f ~/jaxpoison-run.log'"
else
  on_all "set -o pipefail; $run 2>&1 | tee ~/jaxpoison-run.log"
fi
cat <<MSG
results: $RUN_DIR on the shared file system (report.md, results.csv, metrics.jsonl, tensorboard/ from worker 0;
checkpoints/ holds every worker's shards). Copy them off, e.g.:
  ${tpu[*]} scp --recurse $TPU_NAME:$RUN_DIR ./ ${where[*]} --worker=0
delete the slice when done:  ${tpu[*]} delete $TPU_NAME ${where[*]} --quiet
MSG
