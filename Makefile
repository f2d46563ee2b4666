# The README's two commands: `make train` and `make test`. Both set up .venv when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
NPROC ?= 2
CONFIG ?= examples/configs/quickstart.yaml
export DS_BUILD_OPS := 0
# DeepSpeed's JIT-compiled ops are cached inside the venv so one compile serves the whole suite.
export TORCH_EXTENSIONS_DIR := $(CURDIR)/$(VENV)/torch_extensions

.PHONY: train test test-gpu bench reproduce lint format clean-venv

$(VENV)/.installed: pyproject.toml constraints/torch-cpu.txt examples/third_party_plugin/pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PIP) install -q --upgrade pip
	@# Keep a torch that is already installed; otherwise take torch==2.13.0 (the CPU wheel on our machines).
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q -c constraints/torch-cpu.txt torch==2.13.0
	@$(PY) -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/torch-pin.txt
	@$(PIP) install -q -c $(VENV)/torch-pin.txt -e ".[dev,hf,peft,deepspeed]"
	@$(PIP) install -q -c $(VENV)/torch-pin.txt --no-deps -e examples/third_party_plugin
	@touch $@

.venv: $(VENV)/.installed

train: $(VENV)/.installed
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(VENV)/bin/torchrun --standalone --nproc_per_node $(NPROC) -m framework.train --config $(CONFIG) $(ARGS)

test: $(VENV)/.installed
	$(PY) -m pytest -q --durations=15 $(PYTEST_ARGS)

# The CUDA tests (docs/gpu.md); skipped as one line without a GPU.
test-gpu: $(VENV)/.installed
	$(PY) -m pytest -q -rs $(PYTEST_ARGS) tests/gpu

bench: $(VENV)/.installed
	$(PY) benchmarks/moe_layer.py
	$(PY) benchmarks/scaling.py
	$(PY) benchmarks/sft_step.py

# The papers' claims, like for like (docs/results.md): CLAIM=coe or all; resumable, cached per arm and seed.
reproduce: $(VENV)/.installed
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) benchmarks/reproduce.py --claim $${CLAIM:-all} --report $(ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(VENV)/.installed
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean-venv:
	rm -rf $(VENV)
