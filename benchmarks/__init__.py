"""Benchmarks: model cost and throughput (benchmarks.models) and serving load (benchmarks.serving).

Run them with `make bench`; results land in benchmarks/results/ (JSON), docs/RESULTS.md and docs/*.png.
Tests exercise their mechanics only: no timed assertions anywhere.
"""
