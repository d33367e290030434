#!/usr/bin/env bash
# Creates ~/.cache/bert-ref-venv: PyTorch (CPU) + sentence-transformers, the reference that
# benchmarks/embed.py races and tests/fixtures/make_bert_reference.py reads keys from.
# It is kept apart from the project's .venv, which has no PyTorch on purpose.
#
#   bash benchmarks/setup_reference_venv.sh            # REF_VENV=... to put it elsewhere
set -euo pipefail

REF_VENV="${REF_VENV:-$HOME/.cache/bert-ref-venv}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
PYTHON="${PYTHON:-python3.11}"

if [[ ! -x "$REF_VENV/bin/python" ]]; then
  "$PYTHON" -m venv "$REF_VENV"
fi
# torch first (a CPU wheel; pip takes a local one when pip's find-links has it), then
# sentence-transformers with torch pinned in the same command so pip cannot swap it out.
"$REF_VENV/bin/pip" install --quiet "torch==$TORCH_VERSION"
"$REF_VENV/bin/pip" install --quiet sentence-transformers "torch==$TORCH_VERSION"
"$REF_VENV/bin/python" -c '
import sentence_transformers, torch, transformers
print("reference venv ready: torch", torch.__version__, "| sentence-transformers",
      sentence_transformers.__version__, "| transformers", transformers.__version__)
'
echo "$REF_VENV"
