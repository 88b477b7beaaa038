# The two commands of the README: `make demo` and `make test`. Both set up what they need.
PY := .venv/bin/python
PYTEST := $(PY) -m pytest

.PHONY: bootstrap demo test chaos bench lint format clean cluster-up cluster-down

bootstrap:
	@scripts/bootstrap.sh

## The failover demo on a throwaway local cluster (or on REDIS_CLUSTER_NODES).
demo: bootstrap
	$(PY) -m resilient_cache demo

## Unit, integration and the fast core of the chaos suite, against a real local cluster.
test: bootstrap
	$(PYTEST) -m "not chaos_slow" -p no:cacheprovider

## Every chaos round, slow ones included.
chaos: bootstrap
	$(PYTEST) tests/chaos -p no:cacheprovider -s
	$(PYTEST) tests/integration -m chaos_slow -p no:cacheprovider -s

## Throughput against raw redis-py in the same run, and pipeline micro-costs; then throughput
## and p50/p99 at 1, 50 and 500 callers with auto-pipelining off and on; then read routing:
## throughput per strategy, and latency with one replica delayed 20 ms.
bench: bootstrap
	$(PY) -m benchmarks.bench_pipeline
	$(PY) -m benchmarks.bench_throughput
	$(PY) -m benchmarks.bench_routing

lint: bootstrap
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy

format: bootstrap
	.venv/bin/ruff format .
	.venv/bin/ruff check --fix .

cluster-up: bootstrap
	$(PY) -m resilient_cache cluster up

cluster-down: bootstrap
	$(PY) -m resilient_cache cluster down

clean:
	rm -rf .venv build *.egg-info .pytest_cache .mypy_cache .ruff_cache
