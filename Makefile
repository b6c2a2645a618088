# `make serve` and `make test` work on a fresh clone: they create .venv and install on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

.PHONY: install serve test
install: $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/kiln serve --demo

test: $(STAMP)
	$(PY) -m pytest -q
