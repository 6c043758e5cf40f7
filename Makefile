# Two commands on a fresh machine (see README): `make demo` and `make test`.
# Each creates .venv if missing, installs torch (the CPU wheel when none is present) and the package with
# its compiled extension (editable) and the extra it needs (demo: the demo's; test: every one), then runs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
SOURCES := setup.py pyproject.toml CMakeLists.txt $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu')
# A CUDA torch from PyPI is several GB; the CPU wheel (+cpu: a local wheel in pip's find-links, or PyTorch's
# CPU index) is what this project needs without a GPU. A torch already in the venv (e.g. a CUDA build) is kept.
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
define install_torch
	$(1) -c "import torch" 2>/dev/null \
		|| $(1) -m pip install --retries 1 --timeout 20 "torch==2.13.0+cpu" --extra-index-url $(TORCH_CPU_INDEX) \
		|| $(1) -m pip install --retries 1 --timeout 20 "torch>=2.6" --index-url $(TORCH_CPU_INDEX) \
		|| $(1) -m pip install "torch>=2.6"
endef

.PHONY: install demo demo-full test bench gpu-check data sdist-check clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# One stamp per extra: torch, the build tools, and the package (editable, its extension compiled) with that extra.
$(VENV)/.extra-%: $(PY) $(SOURCES)
	$(call install_torch,$(PY))
	$(PIP) install -q setuptools wheel "pybind11>=2.12" "cmake>=3.18" ninja
	$(PIP) install -q --no-build-isolation -e ".[$*]"
	touch $@

install: $(VENV)/.extra-test

demo: $(VENV)/.extra-demo data
	$(PY) -m fvkernels demo

# The committed results in docs/demo: every seed, task and row (69 minutes on 2 cores).
DEMO_FULL := --seeds 0,1,2 --tasks aligned,translated --lambdas 1,100,10000,100000 --trunk-losses discriminative,all \
	--out docs/demo
demo-full: $(VENV)/.extra-demo data
	$(PY) -m fvkernels demo $(DEMO_FULL)

# Fashion-MNIST from Debian's package (the demo's data); `fvkernels demo --data DIR` reads any copy instead.
data:
	@test -d /usr/share/datasets/fashion-mnist || { \
		SUDO=$$([ "$$(id -u)" -eq 0 ] || echo sudo); \
		$$SUDO apt-get install -y dataset-fashion-mnist || { $$SUDO apt-get update && $$SUDO apt-get install -y dataset-fashion-mnist; }; }

test: $(VENV)/.extra-test
	$(PY) -m pytest tests bench -q

bench: $(VENV)/.extra-test
	$(PY) -m pytest bench --benchmark

# On a machine with a GPU, in its own Python (a CUDA torch, triton, pybind11, cmake; no venv, no network needed):
# builds the CUDA kernel for the card, runs the GPU tests and benchmarks, writes bench/RESULTS.md. Exits 0 without a GPU.
gpu-check:
	python3 bench/gpu_check.py

# The pip route: build the sdist and a wheel from it, install the sdist into a fresh venv, encode with the C++ kernel.
SDIST_DIR := build/sdist-check
sdist-check: $(VENV)/.extra-test
	rm -rf $(SDIST_DIR) && mkdir -p $(SDIST_DIR)
	$(PIP) install -q build
	$(PY) -m build --outdir $(SDIST_DIR)/dist  # the sdist, then a wheel built from it
	$(PYTHON) -m venv $(SDIST_DIR)/venv
	$(call install_torch,$(SDIST_DIR)/venv/bin/python)
	$(SDIST_DIR)/venv/bin/python -m pip install -q $(SDIST_DIR)/dist/fvkernels-*.tar.gz
	cd $(SDIST_DIR) && venv/bin/python -c "import fvkernels.ops._extension as e; e.extension(); \
		print('sdist install: fvkernels', __import__('fvkernels').__version__, 'backends', \
		__import__('fvkernels').available_backends())"
	cd $(SDIST_DIR) && venv/bin/fvkernels backends --batch 2 --channels 16 --size 4 --latent 8 --hidden 16 --repeats 1

clean:
	rm -rf build dist $(VENV) fvkernels/_C*.so *.egg-info
