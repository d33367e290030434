#!/usr/bin/env bash
# The device check (docs/benchmarks.md#device-check-mfu-on-one-gpu): training-step MFU and
# tokens/s of experiments/paper/pile.py:425m's model (n 2048, bf16, grad_accum 1) on one GPU,
# one JSON line per batch size, appended to $OUT/device_mfu.jsonl (or ./device_mfu.jsonl).
#
# On the GPU machine, from the repository root. Its image has jax (CUDA), flax and optax but
# not ml_collections and zstandard: put their wheels in .whl/ first (docs/benchmarks.md says
# how); they are installed into /tmp/site. BATCHES="8 16" by default, STEPS=10.
set -uo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
out="${OUT:-.}/device_mfu.jsonl"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
status=0
for batch in ${BATCHES:-8 16}; do
  timeout "${TIMEOUT:-300}" python3 benchmarks/device_mfu.py --expect-backend gpu \
    --batch "$batch" --steps "${STEPS:-10}" --json-out "$out" || {
      echo "device_mfu.sh: batch $batch failed (exit $?)" >&2; status=1; }
done
exit $status
