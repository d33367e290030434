#!/usr/bin/env bash
# The peer's virtualenv: lucidrains' retro-pytorch 0.3.9 on PyTorch (CPU), plus faiss for
# benchmarks/retrieval.py's faiss rows. Kept apart from .venv (PyTorch is not ours to need).
#
#   benchmarks/peer/setup_venv.sh            # creates $PEER_VENV (default benchmarks/.cache/peer-venv)
#
# torch is pinned first: a package that depends on plain `torch` would otherwise pull a
# multi-GB CUDA build. On a machine whose PyPI default is a CUDA wheel, set
# TORCH_INDEX=https://download.pytorch.org/whl/cpu for the CPU build.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
PEER_VENV=${PEER_VENV:-$ROOT/benchmarks/.cache/peer-venv}
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
"$PYTHON" -m venv "$PEER_VENV"
"$PEER_VENV/bin/pip" install -q "pip>=24"
"$PEER_VENV/bin/pip" install -q ${TORCH_INDEX:+--index-url "$TORCH_INDEX"} torch==2.13.0
# --no-deps: retro-pytorch declares autofaiss (numpy < 2, pandas, ...), which the model does
# not use; retro_pytorch_step.py stubs it.
"$PEER_VENV/bin/pip" install -q --no-deps retro-pytorch==0.3.9
"$PEER_VENV/bin/pip" install -q einops==0.8.2 faiss-cpu==1.15.1 numpy==2.4.6
echo "peer virtualenv ready: $PEER_VENV"
