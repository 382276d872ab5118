#!/usr/bin/env bash
# Creates the peer venv used by benchmarks/bench_storage.py and the `peer` tests of
# tests/formats: compressed-tensors (the sparse-24-bitmask layout of vLLM / llm-compressor).
# The CPU torch goes in first so pip never pulls a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-peers/compressed-tensors
test -x "$VENV/bin/python" || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "torch==2.13.0"
"$VENV/bin/python" -m pip install -q "compressed-tensors==0.20.1" safetensors numpy
"$VENV/bin/python" -c "import compressed_tensors, torch; print('compressed-tensors', compressed_tensors.__version__, 'torch', torch.__version__)"
