PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench docs clean

$(PY):
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[train,test]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/quickstart.py

test: $(STAMP)
	$(PY) -m pytest -q

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
$(DOCS_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(DOCS_VENV) || python3 -m venv $(DOCS_VENV)
	$(DOCS_VENV)/bin/pip install --quiet -e ".[docs]"
	touch $@

docs: $(DOCS_VENV)/.installed
	$(DOCS_VENV)/bin/mkdocs build --strict -d site

clean:
	rm -rf $(VENV) $(BENCH_VENV) $(DOCS_VENV) site
