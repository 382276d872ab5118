#!/usr/bin/env bash
# Creates the peer venv with the official `openai` client, used by
# tests/deploy/test_deploy_serve.py::test_the_official_openai_client against `sparsemerge serve`
# (the test also finds the client through $SPARSEMERGE_OPENAI_PYTHON or in the test interpreter).
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=.venv-peers/openai
test -x "$VENV/bin/python" || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "openai>=1.0"
"$VENV/bin/python" -c "import openai; print('openai', openai.__version__)"
