# Two commands on a fresh machine (see README): `make demo` and `make test`.
# Each creates .venv if missing, installs torch (the CPU wheel when none is present) and the package with
# its compiled extension (editable), then runs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.fvkernels-installed
SOURCES := setup.py pyproject.toml CMakeLists.txt $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu')
# A CUDA torch from PyPI is several GB; the CPU wheel (+cpu: a local wheel in pip's find-links, or PyTorch's
# CPU index) is what this project needs without a GPU. A torch already in .venv (e.g. a CUDA build) is kept.
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: install demo test bench data clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) $(SOURCES)
	$(PY) -c "import torch" 2>/dev/null \
		|| $(PIP) install --retries 1 --timeout 20 "torch==2.13.0+cpu" --extra-index-url $(TORCH_CPU_INDEX) \
		|| $(PIP) install --retries 1 --timeout 20 "torch>=2.6" --index-url $(TORCH_CPU_INDEX) \
		|| $(PIP) install "torch>=2.6"
	$(PIP) install -q setuptools wheel "pybind11>=2.12" "cmake>=3.18" ninja
	$(PIP) install -q --no-build-isolation -e ".[test]"
	touch $@

install: $(STAMP)

demo: $(STAMP) data
	$(PY) -m fvkernels demo

# Fashion-MNIST from Debian's package (the demo's data); `fvkernels demo --data DIR` reads any copy instead.
data:
	@test -d /usr/share/datasets/fashion-mnist || { \
		SUDO=$$([ "$$(id -u)" -eq 0 ] || echo sudo); \
		$$SUDO apt-get install -y dataset-fashion-mnist || { $$SUDO apt-get update && $$SUDO apt-get install -y dataset-fashion-mnist; }; }

test: $(STAMP)
	$(PY) -m pytest tests bench -q

bench: $(STAMP)
	$(PY) -m pytest bench --benchmark

clean:
	rm -rf build $(VENV) fvkernels/_C*.so *.egg-info
