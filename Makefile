# Two set-up commands for a fresh machine: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch comes first / in the same pip command: a lone `pip install peft` would pull a multi-GB CUDA build.
TORCH ?= torch==2.13.0
export HF_HUB_OFFLINE = 1
export TRANSFORMERS_OFFLINE = 1

.PHONY: demo test lint install clean browser

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q "$(TORCH)" -e ".[web]"
	touch $@

$(VENV)/.installed-dev: pyproject.toml $(VENV)/.installed
	$(BIN)/pip install -q "$(TORCH)" -e ".[dev,web]"
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	bash scripts/demo.sh

# The browser test (tests/test_web.py) drives Debian's chromium: installed through apt-get when missing (never a
# browser download); without apt or root the target goes on and that test skips, saying why.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo -n)
browser:
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
	  ( $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium chromium-driver ) >/dev/null 2>&1 \
	  || echo "make test: could not install chromium / chromium-driver with apt-get; the browser test will skip"; \
	fi

# Two pytest-xdist workers, one file each at a time and one torch thread each (tests/conftest.py): on 2 cores the
# suite's many small tests overlap instead of waiting on one process's Python overhead.
test: $(VENV)/.installed-dev browser
	$(BIN)/python -m pytest -n 2 --dist loadfile

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check src tests scripts benchmarks

clean:
	rm -rf out .pytest_cache
