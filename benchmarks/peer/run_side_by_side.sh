#!/usr/bin/env bash
# The training step of the peer (retro-pytorch) and ours on the same workload, one after the
# other (never at once: they would share the cores), then one table.
#
#   benchmarks/peer/run_side_by_side.sh [--steps N]
#
# Creates the peer's virtualenv on first use (setup_venv.sh). Env: PEER_VENV, OUT (the JSONL
# file; default a new file under ${TMPDIR:-/tmp}).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
PEER_VENV=${PEER_VENV:-$ROOT/benchmarks/.cache/peer-venv}
OUT=${OUT:-${TMPDIR:-/tmp}/side_by_side-$(date -u +%Y%m%dT%H%M%SZ).jsonl}
[ -x "$PEER_VENV/bin/python" ] || PEER_VENV="$PEER_VENV" "$ROOT/benchmarks/peer/setup_venv.sh"
echo "# results -> $OUT" >&2
"$PEER_VENV/bin/python" "$ROOT/benchmarks/peer/retro_pytorch_step.py" --json-out "$OUT" "$@"
"$ROOT/.venv/bin/python" "$ROOT/benchmarks/train_step.py" --json-out "$OUT" "$@"
"$ROOT/.venv/bin/python" "$ROOT/benchmarks/peer/table.py" "$OUT"
