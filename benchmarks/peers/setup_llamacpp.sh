#!/usr/bin/env bash
# Creates the llama.cpp peer venv for benchmarks/bench_vs_llamacpp.py, idempotently:
#   .venv-peers/llamacpp with llama-cpp-python pinned (its wheel builds llama.cpp from source:
#   ~12 minutes on two cores; a benchmark peer only, never a CI step).
# GGML_NATIVE=ON builds for this CPU (AVX2 / AVX-512 as present), as a user's pip install does.
# Usage: bash benchmarks/peers/setup_llamacpp.sh
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
VENV="${LLAMACPP_VENV:-$ROOT/.venv-peers/llamacpp}"
VERSION="${LLAMACPP_VERSION:-0.3.36}"
PY="${PYTHON:-python3}"
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$VERSION')" 2>/dev/null; then
  echo "llama-cpp-python $VERSION ready in $VENV"; exit 0
fi
mkdir -p "$(dirname "$VENV")"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=ON}" "$VENV/bin/pip" install -q "llama-cpp-python==$VERSION"
"$VENV/bin/python" -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__)"
