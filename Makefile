# The README's two commands: `make repro` (set up, then run the default pipeline)
# and `make test` (set up, then run the tests and the linter).
VENV := .venv
PY := $(VENV)/bin/python
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
# Let Python cache bytecode: the install skips compiling (faster), and with
# PYTHONDONTWRITEBYTECODE set every stage process would recompile diffusers/peft/torch (12 s vs 5 s).
unexport PYTHONDONTWRITEBYTECODE

.PHONY: setup repro test smoke

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --no-compile -e '.[test]'  # .pyc on first import: CI 1 min faster
	touch $@

setup: $(VENV)/.installed

repro: setup
	dvc repro

test: setup
	pytest
	ruff check .

smoke: setup
	bash .ci/smoke
