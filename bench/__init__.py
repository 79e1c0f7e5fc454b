"""Benchmarks of changefeed_sync; run them with ``python bench/run.py``."""
