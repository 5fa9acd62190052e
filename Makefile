# Every target works on a fresh clone: the venv is made and the project installed on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BATCHGEN := $(VENV)/bin/batchgen
STAMP := $(VENV)/.installed

.PHONY: install test demo grid lint bench bench-small clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider

demo: $(STAMP)
	$(BATCHGEN) run manifests/demo.yaml --yes

grid: $(STAMP)
	$(BATCHGEN) grid manifests/demo.yaml --x aspect_ratio --y prompt --out out/demo/contact-sheet.png

lint: $(STAMP)
	$(VENV)/bin/ruff check batchgen tests bench
	$(VENV)/bin/mypy

bench: $(STAMP)
	$(PY) -m bench all

bench-small: $(STAMP)
	$(PY) -m bench all --small

clean:
	rm -rf out state/*.db state/*.db-* .pytest_cache
