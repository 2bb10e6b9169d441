# medfuse: `make demo` runs the main job, `make test` runs the checks.
# torch is pinned first: on this machine `torch==2.13.0` is a CPU build on local disk,
# while any looser request (including the one in pyproject) would pull a multi-GB CUDA build.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH  ?= torch==2.13.0
# Air-gapped by default: no telemetry, no update check, no Ray usage stats.
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1
export RAY_USAGE_STATS_ENABLED := 0
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0

.PHONY: install browser demo readme-demo test lint bench readme-bench clean

install: $(STAMP)

$(STAMP): pyproject.toml scripts/offline-env.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e '.[dev]'
	grep -q MEDFUSE_OFFLINE $(VENV)/bin/activate || cat scripts/offline-env.sh >> $(VENV)/bin/activate
	touch $(STAMP)

demo: install
	$(VENV)/bin/medfuse simulate

# After `make demo`, on the same commit: copy its summary's mean table into README.md
readme-demo: install
	$(PY) -m simulations.readme runs/simulate README.md

test: install lint browser
	$(PY) -m pytest -q --durations=15

# Headless Chromium for the dashboard's browser test: Debian's package, installed when this
# runs as root with apt-get; elsewhere the test is skipped and says why.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
	  && { apt-get install -y -qq chromium >/dev/null 2>&1 \
	       || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq chromium >/dev/null 2>&1; }; }; } \
	  || echo "chromium is not installed (needs root and apt-get): the dashboard's browser test will be skipped"

bench: install
	$(VENV)/bin/medfuse bench --out runs/bench

# After `make bench`, on the same commit: copy every figure of bench.json into README.md
readme-bench: install
	$(PY) -m simulations.readme --bench runs/bench README.md

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache out
