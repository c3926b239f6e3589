"""Benchmarks of TAGI's speed and memory against its alternatives; run them with `python bench/run.py`."""
