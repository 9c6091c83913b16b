# The two commands of the README: `make demo` (the main job on the embedded default) and
# `make test`. Each sets itself up on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup browser demo test bench tiny

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	# torch first and pinned: an unpinned torch pulled in by a dependency would bring CUDA wheels
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -r requirements.txt
	touch $@

# Debian's Chromium for the browser test (Playwright's own browser download needs the network).
browser:
	@[ -x /usr/bin/chromium ] || (apt-get update -q && apt-get install -y -q chromium)

demo: setup
	$(PY) -m phi3mm.demo

test: setup browser
	$(PY) -m pytest -q

bench: setup
	$(PY) -m phi3mm.bench

tiny: setup
	$(PY) -m phi3mm.build outputs/tiny
