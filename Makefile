# The two set-up commands of the README are `make serve` and `make test`; everything else is a helper.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= cpu,dev,distributed
STAMP := $(VENV)/.installed

.PHONY: install tools serve test lint clean peers

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned alone: its CPU wheel must be chosen before anything pulls the CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $(STAMP)

install: $(STAMP)

# The serving peers of benchmarks/peers.py (Ray Serve, PyTriton; docs/BENCHMARKS.md "Serving peers"). PyTriton is
# installed without its declared dependencies (numpy<2 against the project's NumPy 2); Triton's Python backend
# stub, built for NumPy 1, runs on a small environment of its own beside the virtualenv.
TRITON_STUB := $(VENV)/triton-stub
peers: $(STAMP)
	$(PY) -m pip install --quiet -e ".[$(EXTRAS),peers]"
	$(PY) -m pip install --quiet --no-deps nvidia-pytriton==0.7.0
	$(PY) -m venv $(TRITON_STUB)
	$(TRITON_STUB)/bin/python -m pip install --quiet numpy==1.26.4 pyzmq==27.3.0

# promtool validates the Prometheus rules in the tests; Debian's `prometheus` package carries it. espeak-ng speaks
# the known words of the synthetic test calls (tests/scoring/calls).
tools:
	@command -v promtool >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus \
		>/dev/null; } || echo "promtool not installed: its tests will skip"
	@command -v espeak-ng >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends espeak-ng \
		>/dev/null; } || echo "espeak-ng not installed: the synthetic-speech call tests will skip"

serve: $(STAMP)
	$(VENV)/bin/equipoise serve

# The suite keeps about one core busy on its own, so it runs on a pytest-xdist worker per core (two here); a test
# file stays on one worker, so its module-scoped servers start once.
TEST_WORKERS ?= 2
test: $(STAMP) tools
	$(VENV)/bin/lint-imports --no-cache
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) state
