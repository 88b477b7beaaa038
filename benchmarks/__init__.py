"""The benchmarks, run as modules from the repository root (docs/performance.md has the figures):

    .venv/bin/python -m benchmarks.bench_pipeline    # make bench: the pipeline against redis-py
    .venv/bin/python -m benchmarks.bench_telemetry   # telemetry on/off, against the peer stack
    .venv/bin/python -m benchmarks.bench_cache       # memory tier, against cashews and aiocache

Each takes ``--help`` and ``--quick`` (a short run that only checks it works). The helpers they
share are in ``_common``; ``_peer_stack`` and ``_cache_contenders`` hold the other contenders of
bench_telemetry and bench_cache.
"""
