# Two entry points on a fresh machine: `make demo` and `make test`.
# Both build .venv/ (CPU torch from the local wheel, OpenRLHF without its CUDA-only deps).
PY      := .venv/bin/python
PIP     := .venv/bin/pip
STAMP   := .venv/.po-installed

.PHONY: demo test lint install clean

$(STAMP): pyproject.toml requirements-cpu.txt
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q --no-deps "openrlhf==0.11.2"
	DS_BUILD_OPS=0 $(PIP) install -q -r requirements-cpu.txt
	$(PIP) install -q --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m ruff check po_plugins tests examples benchmarks
	$(PY) -m pytest -q tests

demo: $(STAMP)
	$(PY) -m po_plugins.demo --out runs/demo

lint: $(STAMP)
	$(PY) -m ruff check po_plugins tests examples benchmarks

clean:
	rm -rf .venv runs
