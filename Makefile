SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
OLDEST := constraints/oldest.txt

# Job 2 of `make test` runs on the newest Python newer than 3.11 found: pyenv's versions
# first (the bare pyenv shims refuse to run unless PYENV_VERSION names them), then
# python3.1x on PATH. Override with `make test NEWEST_PYTHON=/path/to/python3.x`, or skip
# job 2 with `make test NEWEST_PYTHON=none`.
ifndef NEWEST_PYTHON
NEWEST_PYTHON := $(shell \
  root=$$(pyenv root 2>/dev/null || echo "$${PYENV_ROOT:-$$HOME/.pyenv}"); \
  for p in $$(ls -d "$$root"/versions/3.1* 2>/dev/null | grep -E '/3\.[0-9]+\.[0-9]+$$' | sort -rV \
                | sed -E 's|^(.*/(3\.[0-9]+)\.[0-9]+)$$|\1/bin/python\2|') \
           $$(for m in 19 18 17 16 15 14 13 12; do command -v python3.$$m; done); do \
    if "$$p" -c 'import sys, ensurepip; sys.exit(sys.version_info < (3, 12))' >/dev/null 2>&1; then \
      echo "$$p"; break; \
    fi; \
  done)
endif
export NEWEST_PYTHON
NEWEST_VENV := .venv-newest
# Job 2 checks every annotation of the library at run time, as Equinox's CI does.
HOOK := --jaxtyping-packages=eqx_pmapstate,beartype.beartype
NEWEST_STAMP := $(NEWEST_VENV)/.installed

# One line naming the versions a job runs with.
VERSIONS := import sys; from importlib.metadata import version as v; print("Python " + sys.version.split()[0], *(p + " " + v(p) for p in ("jax", "jaxlib", "equinox", "optax")), sep=", ")

.PHONY: demo test lint test-oldest test-newest bench docs docs-check figures clean

$(PY):
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml $(OLDEST)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[train,test]" -c $(OLDEST)
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/quickstart.py

# lint, job 1 (oldest), job 2 (newest), docs: each runs even when an earlier one failed;
# the summary at the end says which failed, and the exit status is non-zero if any did.
test:
	@failed=""; \
	for t in lint test-oldest test-newest docs; do \
	  $(MAKE) --no-print-directory $$t || failed="$$failed $$t"; \
	done; \
	echo; \
	if [ -n "$$failed" ]; then echo "make test: FAILED:$$failed"; exit 1; fi; \
	echo "make test: all passed (lint, test-oldest, $(if $(filter-out none,$(NEWEST_PYTHON)),test-newest,test-newest SKIPPED), docs)"

# pyright -p .: the settings of this pyproject.toml, whatever config a folder above holds.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/pyright -p .

# Job 1: the oldest supported set, exactly as constraints/oldest.txt pins it, on Python 3.11.
test-oldest: $(STAMP)
	@echo "=== job 1 (oldest): $(VENV), pinned by $(OLDEST)"
	@$(PY) -c '$(VERSIONS)'
	@start=$$(date +%s); $(PY) -m pytest -q; rc=$$?; \
	echo "=== job 1 (oldest) took $$(( $$(date +%s) - start )) s"; exit $$rc

# Job 2: the newest Python here, with the newest releases pip resolves (no constraints).
# The install is stamped: `rm $(NEWEST_STAMP)` (or `make clean`) to pick up new releases.
ifeq ($(filter-out none,$(NEWEST_PYTHON)),)
test-newest:
	@echo "=== job 2 (newest): SKIPPED: $(if $(NEWEST_PYTHON),NEWEST_PYTHON=none,no Python newer than 3.11 found (pyenv versions or python3.1x on PATH)); job 1 only"
else
$(NEWEST_VENV)/bin/python:
	$(NEWEST_PYTHON) -m venv $(NEWEST_VENV)

$(NEWEST_STAMP): $(NEWEST_VENV)/bin/python pyproject.toml
	$(NEWEST_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(NEWEST_VENV)/bin/python -m pip install --quiet --upgrade --upgrade-strategy eager -e ".[train,test]"
	touch $(NEWEST_STAMP)

test-newest: $(NEWEST_STAMP)
	@echo "=== job 2 (newest): $(NEWEST_VENV), from $(NEWEST_PYTHON), newest releases, under jaxtyping's import hook (beartype)"
	@$(NEWEST_VENV)/bin/python -c '$(VERSIONS)'
	@start=$$(date +%s); $(NEWEST_VENV)/bin/python -m pytest -q $(HOOK); rc=$$?; \
	echo "=== job 2 (newest) took $$(( $$(date +%s) - start )) s"; exit $$rc
endif

# brainstate (the reference the init benchmark compares with) lives in its own venv.
BENCH_VENV := .venv-bench
$(BENCH_VENV)/.installed:
	$(PYTHON) -m venv $(BENCH_VENV) || python3 -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install --quiet brainstate==0.5.4 jax==0.10.2 jaxlib==0.10.2
	touch $@

bench: $(STAMP) $(BENCH_VENV)/.installed
	$(PY) benchmarks/bench_init.py --brainstate-python $(BENCH_VENV)/bin/python --rounds 2
	$(PY) benchmarks/bench_step.py

DOCS_VENV := .venv-docs
$(DOCS_VENV)/.installed: pyproject.toml $(OLDEST) constraints/docs.txt
	$(PYTHON) -m venv $(DOCS_VENV) || python3 -m venv $(DOCS_VENV)
	$(DOCS_VENV)/bin/pip install --quiet -e ".[docs]" -c $(OLDEST) -c constraints/docs.txt
	touch $@

docs: $(DOCS_VENV)/.installed
	$(DOCS_VENV)/bin/mkdocs build --strict -d site

# The built site in headless Chromium: every page, its JavaScript errors, images, internal
# links and anchors, and its width on a phone (docs/scripts/check_site.py). Needs Debian's
# browser: `apt-get install -y chromium chromium-driver` (nothing is downloaded).
# `make docs-check SCREENSHOTS=DIR` also saves the home page and a tutorial at 1280 px.
docs-check: docs
	$(DOCS_VENV)/bin/python docs/scripts/check_site.py site $(if $(SCREENSHOTS),--screenshots $(SCREENSHOTS))

# The committed figures of docs/figures/, redrawn in the docs venv (which has the library
# and matplotlib); the training example also needs the train extra (optax), added here
# only. The loss curve is the example's run on 8 CPU devices, which it forces itself.
FIGURES_STAMP := $(DOCS_VENV)/.installed-figures
$(FIGURES_STAMP): $(DOCS_VENV)/.installed
	$(DOCS_VENV)/bin/pip install --quiet -e ".[docs,train]" -c $(OLDEST) -c constraints/docs.txt
	touch $@

figures: $(FIGURES_STAMP)
	MPLBACKEND=Agg $(DOCS_VENV)/bin/python docs/scripts/axes_figure.py
	MPLBACKEND=Agg $(DOCS_VENV)/bin/python benchmarks/plot_results.py
	MPLBACKEND=Agg $(DOCS_VENV)/bin/python docs/scripts/zero_figure.py --from-json
	MPLBACKEND=Agg $(DOCS_VENV)/bin/python examples/train_data_parallel.py --plot docs/figures/loss.png

clean:
	rm -rf $(VENV) $(NEWEST_VENV) $(BENCH_VENV) $(DOCS_VENV) site
