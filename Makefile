# One-command set-up: every target creates .venv when it is missing and installs the project into it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.dyncnn-installed
# Exact pins for this machine (pip takes both from the local disk); pyproject.toml carries lower bounds only.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
EXECUTORCH_PIN := executorch==1.5.1
# The documentation tools (package index), pinned to the versions the site was last built with.
DOCS_PINS := mkdocs==1.6.1 mkdocs-material==9.8.2 mkdocstrings==1.0.8 mkdocstrings-python==2.0.11

.PHONY: install demo test bench docs clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e ".[dev,mobile]" $(TORCH_PINS) $(EXECUTORCH_PIN) $(DOCS_PINS)
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/dyncnn demo --out runs/demo

test: $(STAMP)
	$(PY) -m pytest tests

bench: $(STAMP)
	@for f in benchmarks/bench_*.py; do echo "== $$f"; $(PY) $$f || exit 1; done

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict -d site

clean:
	rm -rf $(VENV) runs build site *.egg-info src/*.egg-info
