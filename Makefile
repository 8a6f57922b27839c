# fmap developer entry points. `make demo` and `make test` create .venv and install on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.fmap-installed

.PHONY: demo readme test test-slow test-gpu bench install clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# Reinstall only when the project's metadata changes; --only-binary keeps a fresh install fast.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --only-binary=:all: -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fmap run recipes/quickstart.yaml

readme: demo  # the README's quickstart table, from the run just made (never pasted by hand)
	$(PY) -m pipeline.report.readme runs/quickstart README.md

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)  # ray: the slow sweep test starts a local Ray cluster (issue 17)
	$(PY) -m pip install -q --only-binary=:all: -e '.[test,models,ray]'
	$(PY) -m pytest -q -m slow

test-gpu: $(STAMP)
	$(PY) -m pytest -q -m gpu

bench: $(STAMP)
	$(PY) -m pip install -q --only-binary=:all: -e '.[test,bench,models]'
	$(PY) benchmarks/run.py --write
	$(PY) benchmarks/int8_pretrained.py --write

clean:
	rm -rf runs .pytest_cache fmap-profile
