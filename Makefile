# Two commands for users: `make serve` and `make test`. Both set up .venv first.
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.peftserve-installed
HOST   ?= 127.0.0.1
PORT   ?= 8000

.PHONY: install serve test lint soak bench clean

install: $(STAMP)

# Re-runs only when pyproject.toml changes. torch 2.13.0 first: where the CPU wheel is on local
# disk pip takes it; elsewhere the normal index. Test clients with stale hub pins go in --no-deps.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	$(PIP) install -q --no-deps lorax-client text-generation
	$(PIP) install -q aiohttp certifi
	touch $(STAMP)

# The demo adapters are trained on the first run only (the app registers them at start; it never trains).
serve: install
	$(VENV)/bin/peftserve train demo
	$(VENV)/bin/peftserve serve --host $(HOST) --port $(PORT)

lint: install
	$(VENV)/bin/ruff check .

# Two workers, one test file each at a time (module fixtures built once): on 2 cores the suite's waits on Ray,
# PostgreSQL and subprocess start-ups overlap the other worker's compute (728 s -> 517 s on the dev machine).
test: install lint
	$(PY) -m pytest -q --timeout 600 --durations=25 -n 2 --dist loadfile

soak: install
	$(PY) -m pytest -q -m soak --timeout 3600

bench: install
	$(VENV)/bin/peftserve bench --preset cpu-small

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
