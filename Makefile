# Two commands a newcomer needs: `make sweep` (the study, embedded default) and `make test`.
# Each creates .venv and installs the project on first use; nothing by hand.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
SWEEP    ?= embedded
EXECUTOR ?= local
ARGS     ?=

.PHONY: sweep test bench gpu-check report install clean-results

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	# facebookresearch's DINOv2 model code, for tests/test_dinov2.py's bit-identity check against torch-fidelity's
	# extractor (torch.hub's copy cannot be fetched here). --no-deps: its metadata pins torch 2.0 and xformers, and
	# its model code needs neither.
	$(PY) -m pip install --quiet --no-deps 'dinov2==0.0.1.dev2'
	@touch $(STAMP)

install: $(STAMP)

sweep: $(STAMP)
	$(VENV)/bin/fluidbench sweep $(SWEEP) --executor $(EXECUTOR) $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(ARGS)

bench: $(STAMP)
	$(VENV)/bin/fluidbench bench $(ARGS)

# On a CUDA machine, <= 5 minutes: bf16 training (eager, compiled) at the largest paper rung that fits, FSDP2,
# KV-cache decode, MFU (docs/benchmarks.md). On a CPU: ARGS=--smoke (the test suite runs that).
gpu-check: $(STAMP)
	$(PY) -m harness.gpu_check $(ARGS)

report: $(STAMP)
	$(VENV)/bin/fluidbench report results/$(SWEEP)
