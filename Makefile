# The README's two commands:  make demo  (built-in corpus → shards → train → evaluate)  and  make test.
# Each creates .venv and installs what it needs; only Python 3.10+ is required on the machine.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
DEMO   ?= data/demo

# torch: a machine with an NVIDIA driver gets PyPI's default (CUDA) build; a CPU-only machine asks for
# torch==2.13.0, which this project's CI machines serve as a small CPU build. Elsewhere add
# TORCH_INDEX=https://download.pytorch.org/whl/cpu to avoid downloading several GB of unused CUDA wheels.
TORCH_SPEC  ?= $(if $(shell command -v nvidia-smi 2>/dev/null),torch,torch==2.13.0)
TORCH_INDEX ?=

.PHONY: demo test bench gpu-check clean-demo

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -e ".[test,plot]"
	touch $@

demo: $(VENV)/.installed
	$(PY) -m speakerid.demo --out $(DEMO)
	$(PY) -m shardify verify $(DEMO)/shards/train

test: $(VENV)/.installed
	$(PY) -m pytest -q

bench: $(VENV)/.installed
	$(PY) benchmarks/run_all.py $(if $(shell command -v nvidia-smi 2>/dev/null),--device cuda)

# The GPU device check (benchmarks/README.md, "GPU check"); no .venv: the device's python3 holds torch, and the
# wheels it lacks travel in .whl/ (bash benchmarks/gpu_wheels.sh where there is network).
# make gpu-check [GPU_OUT=/tmp/gpu-check] [GPU_ARGS="--tiny --device cpu"]
GPU_OUT  ?= /tmp/gpu-check
GPU_ARGS ?=
gpu-check:
	PYTHON=$(PYTHON) bash benchmarks/gpu_check.sh $(GPU_OUT) $(GPU_ARGS)

clean-demo:
	rm -rf $(DEMO)
