#!/usr/bin/env bash
# Create the mergekit peer venv used by tests/merge/test_merge_vs_mergekit.py and
# benchmarks/bench_merge_speed.py. Idempotent: reruns only fill in what is missing.
#   bash benchmarks/peers/setup_mergekit.sh
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
VENV="${MERGEKIT_VENV:-$ROOT/.venv-peers/mergekit}"
MERGEKIT_VERSION="0.1.5"
if [ -x "$VENV/bin/mergekit-yaml" ] && "$VENV/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('mergekit') != '$MERGEKIT_VERSION')" 2>/dev/null; then
  echo "mergekit $MERGEKIT_VERSION ready in $VENV"
  exit 0
fi
mkdir -p "$(dirname "$VENV")"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
# CPU torch first so that mergekit's dependency on torch never pulls a CUDA build.
"$VENV/bin/pip" install -q torch==2.13.0
"$VENV/bin/pip" install -q "mergekit==$MERGEKIT_VERSION"
"$VENV/bin/mergekit-yaml" --help >/dev/null
echo "mergekit $MERGEKIT_VERSION ready in $VENV"
