# Quick start: `make demo` (the main job on the embedded data set) and `make test` (the whole suite).
# Both use the active virtual environment, or create .venv when none is active.
SHELL := /bin/bash
empty :=
space := $(empty) $(empty)
ifdef VIRTUAL_ENV
# make splits a path with a space into two: `make clean` removed what lay before the space.
ifneq ($(findstring $(space),$(VIRTUAL_ENV)),)
$(error VIRTUAL_ENV '$(VIRTUAL_ENV)' holds a space, which make cannot take; use an environment without one)
endif
PYTHON := python
STAMP := $(VIRTUAL_ENV)/.dmhpc-install-stamp
else
PYTHON := .venv/bin/python
STAMP := .venv/.dmhpc-install-stamp
endif
DEMO_OUT ?= runs/demo
PYTEST_ARGS ?=
# Two pytest-xdist workers: most tests use one core at a time (child ranks run one thread each), so two
# fill a 2-core machine; `make test PYTEST_WORKERS=0` runs the suite in one process (for -s or --pdb).
PYTEST_WORKERS ?= 2
# Extra pip arguments for torch alone. From public PyPI, torch==2.13.0 for Linux is the CUDA build (GBs) even
# without a GPU: `make install TORCH_PIP_ARGS='--index-url https://download.pytorch.org/whl/cpu'` takes the CPU one.
TORCH_PIP_ARGS ?=

.PHONY: install demo test bench clean

# pip is the last thing venv installs: a venv interrupted while being made has none, and is made again.
.venv/bin/pip:
	python3 -m venv --clear .venv

# Reinstall only when the package metadata or the pins change. The stamp lives in the environment
# it stands for: a .venv removed (or another one activated) is installed into again.
$(STAMP): setup.cfg pyproject.toml constraints.txt | $(if $(VIRTUAL_ENV),,.venv/bin/pip)
	$(PYTHON) -m pip install -q --upgrade pip
	# torch first and pinned: an unpinned resolve would pull several GB of CUDA wheels.
	$(PYTHON) -m pip install -q -c constraints.txt $(TORCH_PIP_ARGS) torch==2.13.0
	$(PYTHON) -m pip install -q -c constraints.txt -e '.[all]'
	touch $@

install: $(STAMP)

demo: install
	$(PYTHON) -m dmhpc demo --out "$(DEMO_OUT)"

test: install
	$(PYTHON) -m pytest -n $(PYTEST_WORKERS) $(PYTEST_ARGS)

# The CPU benchmarks behind docs/benchmarks.md (a few minutes on 2 cores); bench/throughput.py is
# the GPU grid, run it by hand on a GPU machine.
CPU_BENCH := bench/synth.py bench/prepare.py bench/read.py bench/mmd.py bench/loaders.py bench/train_step.py

# Every script runs: one that fails, or misses a target it checks (bench/mmd.py and bench/synth.py do; the
# others print figures that docs/benchmarks.md holds against its targets), is named at the end.
bench: install
	@failed=""; for b in $(CPU_BENCH); do echo "== $$b"; $(PYTHON) $$b || failed="$$failed $$b"; done; \
	if [ -n "$$failed" ]; then echo "failed or missed a target:$$failed"; exit 1; fi

# The demo's output, the install stamp (the next target reinstalls) and pytest's cache; never runs/,
# which holds every config's and study's results: DEMO_OUT is removed only where the demo marked it.
clean:
	@[ -n "$(strip $(DEMO_OUT))" ] || { echo "make clean: DEMO_OUT is empty; nothing removed" >&2; exit 2; }
	@[ ! -e "$(DEMO_OUT)" ] || [ -f "$(DEMO_OUT)/.dmhpc-demo.json" ] || { echo "make clean: $(DEMO_OUT) is not \
	a demo's folder (no .dmhpc-demo.json in it); nothing removed" >&2; exit 2; }
	rm -rf -- "$(DEMO_OUT)" "$(STAMP)" .pytest_cache
