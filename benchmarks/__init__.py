"""Benchmarks run on the accelerator: each prints ours beside the baselines measured in the same run."""
