# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
TORCH  := torch==2.13.0

.PHONY: demo test bench clean

# deepspeed ships as a source archive whose build imports torch: it is built against the torch
# installed here (no build isolation), else pip would fetch a second, CUDA torch to build it.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH) setuptools wheel
	DS_BUILD_OPS=0 $(PY) -m pip install --quiet --no-build-isolation 'deepspeed>=0.15'
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m moesys_compile.demo

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) -m benchmarks.compile_latency
	$(PY) -m benchmarks.moe_layer
	$(PY) -m benchmarks.train_ep
	$(PY) -m benchmarks.train_ep --experts fine
	$(PY) -m benchmarks.ring_infer
	$(PY) -m benchmarks.ring_memory

clean:
	rm -rf $(VENV) out build *.egg-info
