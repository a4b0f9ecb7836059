"""Job definitions: run configs, curriculum stages and benchmarks."""
