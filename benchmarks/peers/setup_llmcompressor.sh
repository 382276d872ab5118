#!/usr/bin/env bash
# Creates the peer venv for the calibrated-pruning benchmark (issue 6), idempotently:
#   .venv-peers/llmcompressor with CPU torch first (never a CUDA wheel), then llmcompressor pinned.
# Usage: bash benchmarks/peers/setup_llmcompressor.sh
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
VENV="$ROOT/.venv-peers/llmcompressor"
LLMC_VERSION="${LLMC_VERSION:-0.14.0.1}"
PY="${PYTHON:-python3}"
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import llmcompressor, sys; sys.exit(0 if llmcompressor.__version__.startswith('${LLMC_VERSION%.*}') else 1)" 2>/dev/null; then
  echo "llmcompressor already installed in $VENV"; exit 0
fi
mkdir -p "$ROOT/.venv-peers"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
# CPU torch first so that llmcompressor's torch requirement is already satisfied.
"$VENV/bin/pip" install -q "torch==2.13.0"
"$VENV/bin/pip" install -q "llmcompressor==$LLMC_VERSION"
"$VENV/bin/python" -c "import torch, llmcompressor; print('llmcompressor', llmcompressor.__version__, 'torch', torch.__version__)"
