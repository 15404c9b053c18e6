# The two commands a newcomer needs: `make demo` (set up, run the main job) and `make test`.
# Everything installs into .venv (the tools extra too: synth and score need it); the tests start
# their own Kafka broker.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup system-deps demo test lint format lock clean bench-engine bench-loop gpu-kit gpu-kit-verify

setup: $(STAMP)

$(STAMP): pyproject.toml
	@command -v java >/dev/null || { echo "Java 17+ is needed for the local Kafka broker" >&2; exit 2; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,tools]'
	@touch $@

# espeak-ng makes the synthetic conversations; promtool (Debian's prometheus) checks the alert
# rules; Debian's chromium runs the live demo page's browser test (Playwright drives it, no
# downloads); sox is handy for inspecting audio by hand.
system-deps:
	@command -v espeak-ng >/dev/null && command -v promtool >/dev/null && command -v chromium >/dev/null || { \
		apt-get update -qq && apt-get install -y -qq espeak-ng sox prometheus chromium; }

demo: setup system-deps
	$(PY) -m worker demo

# pytest exits 5 when it collected nothing: that is a failure here, not a pass.
test: setup system-deps
	@$(PY) -m pytest; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi; exit $$rc

# Benchmarks (bench/, not shipped): small runs that fit a shared 2-core machine; see BENCHMARKS.md.
BENCH_ENGINE_ARGS ?= --size tiny --threads 1 --calls 1,4
bench-engine: setup
	nice -n 5 $(PY) -m bench engine $(BENCH_ENGINE_ARGS)

bench-loop: setup
	nice -n 5 $(PY) -m bench loop --streams 50 --records 5000 --latency-sec 5

# GPU kit (ignored folder gpu-kit/): wheels a CUDA PyTorch image lacks to run the engine, for
# Python 3.11 and 3.12, plus pre-rendered call audio; bench/gpu.sh installs and runs it offline.
gpu-kit: setup system-deps
	PY=$(PY) bench/make_gpu_kit.sh

# The kit's list is complete: a clean venv with only the baseline imports and steps the engine.
gpu-kit-verify: gpu-kit
	PY=$(PY) nice -n 5 bench/verify_gpu_kit.sh

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# The image's pinned runtime dependencies, from the environment the tests ran in.
lock: setup
	$(PY) deploy/lock_requirements.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
