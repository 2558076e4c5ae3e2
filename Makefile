# Two commands:  make demo   (the main job)   and   make test   (every test and every notebook).
# Each creates .venv on first use and installs what it needs; nothing has to be installed by hand.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# torch is installed first, pinned, so that a CPU machine with a local CPU wheel (or a CPU index given in
# TORCH_INDEX, e.g. the PyTorch CPU wheel index) never resolves to the multi-GB CUDA build.
TORCH_VERSION := 2.13.0
TORCH_INDEX ?=
TORCH_PIP_ARGS := $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX),)
# pytest workers: 2 on the 2-core CI machine
JOBS ?= 2

.PHONY: demo test test-fast test-random notebooks lab venv clean help browser

help:
	@echo "make demo       the main job: python -m glm5_ref demo"
	@echo "make test       every test and every notebook (nbmake), as CI runs it"
	@echo "make test-fast  the tests without the notebooks"
	@echo "make test-random  every test and notebook in a random order (pytest-random-order; the seed is printed)"
	@echo "make notebooks  re-execute every notebook from notebooks/src and save its outputs"
	@echo "make lab        open the notebooks in JupyterLab (this environment's python3 kernel; jupytext pairs sources)"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.runtime: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet torch==$(TORCH_VERSION) $(TORCH_PIP_ARGS)
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.test: pyproject.toml $(VENV)/.runtime
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

venv: $(VENV)/.test

demo: $(VENV)/.runtime
	$(BIN)/python -m glm5_ref demo

# Debian's chromium for the slide reward's browser tests (installs once when missing; never fails the build)
browser:
	@bash scripts/setup_browser.sh

test: $(VENV)/.test browser
	$(BIN)/python -m pytest -n $(JOBS) --dist loadfile --durations=20 tests --nbmake --nbmake-timeout=180 notebooks/*.ipynb

# the same suite in a random order, across the workers by test (not by file): order dependencies show up here
test-random: $(VENV)/.test browser
	$(BIN)/python -m pytest -n $(JOBS) -p random_order --random-order-bucket=global tests --nbmake \
		--nbmake-timeout=180 notebooks/*.ipynb

test-fast: $(VENV)/.test browser
	$(BIN)/python -m pytest -n $(JOBS) --dist loadfile tests

notebooks: $(VENV)/.test
	$(BIN)/python scripts/nb.py --all

# JupyterLab from .venv: its python3 kernel is the one the notebooks name; LAB_ARGS e.g. --no-browser --port 8899
# (--allow-root when run as root, as in a container: JupyterLab refuses root otherwise)
lab: $(VENV)/.runtime
	$(BIN)/jupyter lab --notebook-dir=notebooks $(if $(filter 0,$(shell id -u)),--allow-root,) $(LAB_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
