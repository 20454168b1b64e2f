# The two set-up commands. Both create .venv on first use (pip, Python >= 3.10).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Parallel test workers: the suite is sized for 2 cores.
TEST_WORKERS ?= 2

.PHONY: demo test venv clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[notebooks,dev]'
	touch $@

demo: venv
	$(BIN)/bitlab demo --out demo_out --figures figures

test: venv
	$(BIN)/python -m pytest -n $(TEST_WORKERS) tests

clean:
	rm -rf $(VENV) demo_out .pytest_cache
	find figures -type f ! -name README.md -delete  # figures/README.md is committed
