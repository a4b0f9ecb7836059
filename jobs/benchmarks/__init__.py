"""Benchmarks: each runnable as ``python -m omnidiff.jobs.benchmarks.<name>``."""
