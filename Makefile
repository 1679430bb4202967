# pixelray: set-up and everyday commands. `make install && make test` on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test lint demo bench clean cluster-local cluster-stop

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch first, with pip, from the pinned versions (pip takes them from the local wheel store where there
	# is one); --no-compile: the bytecode is compiled below, for everything at once, on every core.
	$(BIN)/pip install -q --no-compile -c constraints.txt torch torchvision
	# the rest with uv (pinned too): the same pins, downloaded in parallel, cached between installs
	$(BIN)/pip install -q --no-compile -c constraints.txt uv
	$(BIN)/uv pip install -q --python $(BIN)/python -c constraints.txt -e '.[dev]'
	# then the bytecode of everything, once (~50 s on 2 cores). Where PYTHONDONTWRITEBYTECODE is set (CI
	# machines, containers) Python never writes it, and every process would compile torch and Ray afresh:
	# 8 s instead of 3 to import them, in each of the hundreds of processes a test run starts (Ray workers).
	# A file that does not compile (vendored Python 2 in some wheels) is skipped, as pip does.
	-$(BIN)/python -m compileall -qq -j 0 $(VENV)/lib pixelray tests
	touch $(STAMP)

test: $(STAMP)  # the slowest tests are listed at the end
	$(BIN)/python -m pytest -q --durations=25

lint: $(STAMP)
	$(BIN)/ruff check pixelray tests benchmarks jobs cluster

demo: $(STAMP)
	$(BIN)/pixelray demo

bench: $(STAMP)  # each prints one JSON line; see the docstrings for GPU flags
	$(BIN)/python benchmarks/perturb.py
	$(BIN)/python benchmarks/shards.py
	$(BIN)/python benchmarks/fgsm.py
	$(BIN)/python benchmarks/failure.py
	$(BIN)/python benchmarks/sweep.py
	$(BIN)/python benchmarks/small_shards.py
	$(BIN)/python benchmarks/train.py

# A Ray head on 127.0.0.1 for `ray job submit` (token auth, Ray's metrics export), and only that one
# stopped again; see cluster/README.md. Another Ray on this machine holds a port? Override it:
#   make cluster-local CLUSTER_DIR=/tmp/pxr2 CLUSTER_PORT=6380 CLUSTER_DASHBOARD_PORT=8266 ...
# RAY_AUTH_TOKEN=... make cluster-local uses your token; otherwise one is generated into $(CLUSTER_DIR)/auth_token.
CLUSTER_DIR ?= /tmp/pxr-$(shell id -u)
CLUSTER_PORT ?= 6379
CLUSTER_DASHBOARD_PORT ?= 8265
CLUSTER_METRICS_PORT ?= 8080
CLUSTER_CLIENT_PORT ?= 10001
CLUSTER_AGENT_PORT ?= 52365
CLUSTER_MIN_WORKER_PORT ?= 10002
CLUSTER_MAX_WORKER_PORT ?= 19999
CLUSTER_CPUS ?=

cluster-local: $(STAMP)
	$(BIN)/python cluster/local.py start --dir $(CLUSTER_DIR) --port $(CLUSTER_PORT) \
		--dashboard-port $(CLUSTER_DASHBOARD_PORT) --metrics-port $(CLUSTER_METRICS_PORT) \
		--client-port $(CLUSTER_CLIENT_PORT) --agent-port $(CLUSTER_AGENT_PORT) \
		--min-worker-port $(CLUSTER_MIN_WORKER_PORT) --max-worker-port $(CLUSTER_MAX_WORKER_PORT) \
		$(if $(CLUSTER_CPUS),--num-cpus $(CLUSTER_CPUS))

cluster-stop:
	$(BIN)/python cluster/local.py stop --dir $(CLUSTER_DIR)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info
